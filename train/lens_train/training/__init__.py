"""What stage 2 training needs (``lens-train``): presets (:mod:`.presets`, the JSON files in
``presets/``) and the :class:`~.config.TrainConfig` they fill, a run's typed ``config.json``
(:mod:`.run_config`), opening and checking the feature stores (:mod:`.stores`), the dataset,
task-mixing sampler and loader (:mod:`.data`), the loop itself (:mod:`.trainer`) and its atomic
checkpoints (:mod:`.checkpoint`, also read by evaluation, inference and reproduction). It imports
nothing from the other subpackages; they import from it.
"""
