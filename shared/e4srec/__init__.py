"""E4SRec as a Kubeflow pipeline: the package every stage and component imports."""

import logging

# bitsandbytes warns at import, on CPUs with AVX-512 BF16, that its optional `kernels` download
# (a faster 4-bit CPU matmul from the Hugging Face hub) is missing: every LLM stage would print it,
# offline runs cannot act on it, and 4-bit on CPU works without it (tested).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
