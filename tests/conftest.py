"""Shared test set-up: runs before any test module is imported.

- TRITON_INTERPRET=1 must be set before any module with @triton.jit is imported (docs/MACHINE.md).
- Nothing may reach the Hugging Face hub: offline flags, so an accidental call fails at once.
- Hypothesis profiles, chosen by HYPOTHESIS_PROFILE: "ci" (the default: deterministic, no
  deadline, 25 examples a property; the splitting invariants ask for at least 200,
  tests/strategies.SPLIT_EXAMPLES), "dev" (200 everywhere) and "thorough" (2,000 everywhere,
  the splitting invariants included: `HYPOTHESIS_PROFILE=thorough pytest tests/test_split.py`).
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture])
settings.register_profile(
    "dev", max_examples=200, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture])
settings.register_profile(
    "thorough", max_examples=2000, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

import torch  # noqa: E402

torch.set_num_threads(1)  # two cores are shared by everything; tests stay single-threaded

try:  # test-only fixes for Triton interpreter gaps (bf16 tl.dot, float args, rsqrt/tanh stubs)
    from tests import triton_interp_patch  # noqa: F401
except ImportError:
    pass
