"""The toy world's pretraining: how the project's toy SAM and toy LLaVA are made (``lens-toy``).

LENS presupposes a pretrained MLLM and a pretrained SAM; this package pretrains small ones of the real
classes on the synthetic world and exports them as the shipped weights. The guide: ``toy/README.md``.

- :mod:`.world`: the pretraining and held-out scenes; :mod:`.conversations`: what the toy LLaVA is taught;
- :mod:`.sam`, :mod:`.llava`: the pretraining and held-out evaluation of each model;
- :mod:`.loop`: the resumable training loop they share; :mod:`.export`: the shipped weights and their
  ``MANIFEST.json``; :mod:`.cli`: ``lens-toy``.

What *loading* the toy backbones needs (the weights folder, the toy SAM's architecture, the toy LLaVA's prompt)
is not here but in :mod:`lens_cache.backbones.toy`: stage 1 loads them without importing this package. The
import rule (``tests/test_import_layout.py``): ``lens_toy`` may import ``lens_core``, ``lens_manifests`` and
``lens_cache``; of the project's packages only ``lens_train`` (Table 1, the toy MME and routing sets, the
LISA-style baseline) imports it.
"""
