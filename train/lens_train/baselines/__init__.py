"""Baselines LENS is compared with: a LISA-style fine-tune of the MLLM (``lisa``, ``lisa_run``, ``cli``)."""
