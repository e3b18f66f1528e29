"""Measuring LENS and the MLLM it reads: ``lens-eval``'s gIoU / cIoU of a trained run on a feature
store, with its trivial baselines and overlay page (:mod:`.evaluate`), and the frozen guarantee made
checkable, an exact checksum of the MLLM's weights (:mod:`.frozen`). Builds on :mod:`lens_train.training`.
"""
