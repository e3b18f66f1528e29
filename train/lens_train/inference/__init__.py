"""Using a trained run on new inputs with the backbones running live (no cache): ``lens-segment``
segments one image (:mod:`.segment`), and ``lens-chat`` puts LENS inside an agent that routes each
instruction to dialogue, segmentation or a follow-up (:mod:`.agent`, the supplement's Algorithm S1).
"""
