"""Test-session setup.

numpy's BLAS runs the solvers' small matrix products (K of 64..1536 here); spread over
threads they gain nothing and, on a machine that is busy with anything else, the
spinning threads slow the suite down several times. One BLAS thread keeps the suite's
time stable; it does not change any result the tests check.
"""
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
