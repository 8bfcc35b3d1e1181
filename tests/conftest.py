"""Shared test settings: tiny models, one thread (tests run beside other CPU work), offline Gradio."""
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("DIT_TEST_THREADS", "1")))
