"""Other people's LENS: the authors' checkpoints and head inputs (:mod:`.authors`), converted into run
folders (:mod:`.convert`, the ``lens-convert`` command in :mod:`.cli`)."""
