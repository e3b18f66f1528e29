"""Model folders: a trained LENS head in the Hugging Face layout, and the one loader of every checkpoint.

A run folder (``lens-train --out RUN``) holds what resuming needs (optimizer state, metrics, curve); a
model folder holds what using the head needs, in the layout of ``huggingface_hub``'s
:class:`~huggingface_hub.ModelHubMixin` (``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``)::

    config.json         format "lens-model", the LensConfig, preset, training settings (threshold,
                        precision, seed), layer, SAM spec, the backbone identity its features came from
                        (``identity``, checked against every live backbone and store), a readable
                        summary of it (``backbone``), the step, and where it came from (``source``)
    model.safetensors   the trainable tensors, exactly as the run's checkpoint holds them
    README.md           the model card (:mod:`.model_card`)

``lens-export-model RUN --out DIR`` (:func:`export_model`) writes one; ``lens-train`` writes ``RUN/model``
at the end of a finished run. :func:`open_trained` is the one loader of what ``--checkpoint`` takes
(``lens-segment``, ``lens-eval``, ``lens-chat``, :class:`~lens_train.inference.segmenter.Segmenter`): a
run folder, a model folder, ``toy`` (the head shipped beside the toy backbones), or a Hub model id
(downloaded by ``huggingface_hub`` when a network is there). Every kind comes back as a
:class:`~.run_config.RunConfig` and a weights file, so the rest of the code never asks which it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelHubMixin

from ..errors import UserError
from .checkpoint import MODEL_FILE, checkpoint_step
from .run_config import CONFIG_FILE, RUN_FORMAT, RunConfig, StoreRecord, read_run_config

__all__ = ["MODEL_DIR", "MODEL_FORMAT", "MODEL_FORMAT_VERSION", "README_FILE", "TOY_HEAD", "LensModel", "Trained",
           "export_model", "model_config_of", "open_trained", "run_config_of"]

MODEL_FORMAT = "lens-model"
#: the format this code writes; it reads this one and every older one
MODEL_FORMAT_VERSION = 1
README_FILE = "README.md"
#: ``RUN/model``: the model folder lens-train writes at the end of a finished run.
MODEL_DIR = "model"
#: ``--checkpoint toy``: the head shipped beside the toy backbones (``lens_cache/backbones/toy_weights/lens_head``).
TOY_HEAD = "toy"
TOY_HEAD_DIR = "lens_head"
#: ``owner/name``: what is tried on the Hub when no such local folder exists.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_NOT_FOUND_HINT = ("pass --checkpoint with a run folder written by lens-train, a model folder written by "
                   "lens-export-model, or toy")


# ----------------------------------------------------------------------------- config.json


def backbone_summary(config: RunConfig) -> dict[str, Any]:
    """The backbone of ``config`` in readable words (config.json's ``backbone``; the check uses ``identity``)."""
    identity = dict(config.stores[0].identity)
    sam = identity.get("sam") or {}
    question_set = identity.get("question_set")
    return {
        "mllm": identity.get("name_or_path") or identity.get("backbone") or identity.get("mllm"),
        "family": identity.get("backbone"),
        "revision": identity.get("weights_sha256") or identity.get("weights_fingerprint"),
        "layer": config.layer,
        "prompt_template": identity.get("prompt_template"),
        "question_set": question_set.get("name") if isinstance(question_set, dict) else None,
        "question_template": identity.get("question_template"),
        "compute_dtype": identity.get("compute_dtype"),
        "sam": config.sam,
        "sam_variant": sam.get("variant"),
        "sam_weights": sam.get("weights"),
    }


def model_config_of(config: RunConfig, *, step: int, run_dir: str | Path | None = None) -> dict[str, Any]:
    """config.json of a model folder holding the weights of ``config``'s run at ``step``."""
    return {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "library_name": "lens-seg",
        "preset": config.preset,
        "preset_description": config.preset_description,
        "model": config.model.to_dict(),
        "train": config.train.to_record(),
        "layer": config.layer,
        "sam": config.sam,
        "identity_hash": config.identity_hash,
        "identity": dict(config.stores[0].identity),
        "backbone": backbone_summary(config),
        "step": int(step),
        "source": {
            "run": str(run_dir) if run_dir is not None else None,
            "stores": [{k: v for k, v in s.to_dict().items() if k != "identity"} for s in config.stores],
            "cli": dict(config.cli), "device": config.device, "precision": config.precision,
            "versions": dict(config.versions), "created": config.created,
            "warm_start": dict(config.warm_start) if config.warm_start is not None else None,
            "run_format_version": config.format_version,
        },
    }


def run_config_of(values: Any, *, source: str | Path) -> RunConfig:
    """The :class:`RunConfig` a model folder's config.json stands for (every store gets its ``identity``).

    Raises:
        UserError: not a LENS model config, a newer format, or a key missing or damaged (one line).
    """
    if not isinstance(values, dict) or values.get("format") != MODEL_FORMAT:
        raise UserError(f"{source} is not a LENS model config (format {MODEL_FORMAT!r})")
    version = values.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= MODEL_FORMAT_VERSION:
        raise UserError(f"{source} is model format {version!r}; this lens-seg reads format {MODEL_FORMAT_VERSION}: "
                        "read it with the lens-seg that wrote it, or upgrade this one")
    try:
        origin = values.get("source") or {}
        identity = values["identity"]
        stores = tuple(StoreRecord.from_dict({**s, "identity": identity}) for s in origin.get("stores") or ()) or (
            StoreRecord(url="", identity_hash=values["identity_hash"], manifest_hash="", spec=None,
                        layers=(int(values["layer"]),), num_queries=0, num_valid_queries=0, identity=identity),)
        run = RunConfig.from_dict({
            "format": RUN_FORMAT, "format_version": 1, "preset": values["preset"],
            "preset_description": values.get("preset_description", ""), "model": values["model"],
            "train": values["train"], "layer": values["layer"], "sam": values["sam"],
            "identity_hash": values["identity_hash"], "stores": [s.to_dict() for s in stores],
            "cli": origin.get("cli") or {}, "device": origin.get("device", "cpu"),
            "precision": origin.get("precision", values["train"].get("precision", "fp32")),
            "versions": origin.get("versions") or {}, "created": origin.get("created", ""),
            **({"warm_start": origin["warm_start"]} if origin.get("warm_start") is not None else {}),
        }, source=source)
    except KeyError as error:
        raise UserError(f"{source} lacks {error.args[0]!r}: the file is damaged; export the run again "
                        "with lens-export-model") from None
    except (TypeError, AttributeError) as error:
        raise UserError(f"{source}: {error}: the file is damaged; export the run again with lens-export-model") from None
    return run


# ----------------------------------------------------------------------------- the Hub mixin


class LensModel(ModelHubMixin, library_name="lens-seg", license="apache-2.0", pipeline_tag="image-segmentation",
                tags=["lens", "segmentation", "reasoning-segmentation", "referring-segmentation"]):
    """A model folder in memory: its config.json (a dict), its weights file and its card.

    ``save_pretrained(DIR)`` writes the folder, ``from_pretrained(DIR or owner/name)`` reads one (a
    Hub id is downloaded into the Hugging Face cache), ``push_to_hub(owner/name)`` uploads one: the
    ``ModelHubMixin`` conventions, the three files written by :meth:`_save_pretrained`.

    Args:
        config: config.json's content (:func:`model_config_of`).
        weights_file: a ``model.safetensors`` of trainable tensors (copied, or hard-linked, on save).
        card: README.md's text; None: :func:`.model_card.model_card` of the config alone.
    """

    def __init__(self, config: dict, weights_file: Path | None = None, card: str | None = None) -> None:
        self.config = config
        self._hub_mixin_config = config  # what save_pretrained / push_to_hub would write as config.json
        self.weights_file = Path(weights_file) if weights_file is not None else None
        self.card = card

    def run_config(self, source: str | Path = CONFIG_FILE) -> RunConfig:
        return run_config_of(self.config, source=source)

    def card_text(self) -> str:
        from .model_card import model_card

        return self.card if self.card is not None else model_card(self.config)

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        return ModelCard(self.card_text())

    def _save_pretrained(self, save_directory: Path) -> None:
        if self.weights_file is None:
            raise ValueError("this LensModel has no weights file to save")
        save_directory = Path(save_directory)
        (save_directory / CONFIG_FILE).write_text(json.dumps(self.config, indent=2) + "\n")
        target = save_directory / MODEL_FILE
        try:  # the run replaces its file by a rename at each save, never in place: a link stays this step's
            os.link(self.weights_file, target)
        except OSError:
            shutil.copyfile(self.weights_file, target)
        (save_directory / README_FILE).write_text(self.card_text())

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: str | Path | None,
                         force_download: bool, local_files_only: bool, token: str | bool | None,
                         config: dict | None = None, **kwargs: Any) -> LensModel:
        if config is None:
            raise UserError(f"{model_id} is not a LENS model folder ({CONFIG_FILE} missing)")
        if os.path.isdir(model_id):
            weights, readme = Path(model_id) / MODEL_FILE, Path(model_id) / README_FILE
        else:
            from huggingface_hub import hf_hub_download

            def fetch(name: str) -> Path:
                return Path(hf_hub_download(repo_id=model_id, filename=name, revision=revision, cache_dir=cache_dir,
                                            force_download=force_download, token=token,
                                            local_files_only=local_files_only))
            weights, readme = fetch(MODEL_FILE), fetch(README_FILE)
        return cls(config=config, weights_file=weights, card=readme.read_text() if readme.is_file() else None)


# ----------------------------------------------------------------------------- the one loader


@dataclass(frozen=True)
class Trained:
    """What ``--checkpoint`` named, whatever kind it was.

    Attributes:
        path: the local folder (a Hub model: its snapshot in the Hugging Face cache).
        kind: ``"run"`` (lens-train) or ``"model"`` (a model folder).
        config: the run's config (for a model folder: :func:`run_config_of`).
        weights: its ``model.safetensors``; step: the step the weights are from (None: a run without a checkpoint).
    """

    path: Path
    kind: str
    config: RunConfig
    weights: Path
    step: int | None

    def load_into(self, model: Any) -> int:
        """Load the trained tensors into ``model`` strictly (safetensors only); returns their step.

        Raises:
            UserError: no checkpoint, a file that does not fit the model, or a step that disagrees with the
                config's (an interrupted save, a mixed-up folder).
        """
        from .checkpoint import load_checkpoint, load_trainable

        if self.kind == "run":
            return load_checkpoint(self.path, model, with_optimizer=False).step
        step = load_trainable(model, self.weights)
        if step != self.step:
            raise UserError(f"{self.path}: {MODEL_FILE} is from step {step} but {CONFIG_FILE} says {self.step}: "
                            "the folder is mixed up; export the run again with lens-export-model")
        return step


def toy_head_dir() -> Path:
    from lens_cache.backbones.toy import WEIGHTS_DIR

    return WEIGHTS_DIR / TOY_HEAD_DIR


def open_trained(checkpoint: str | Path) -> Trained:
    """The run folder, model folder, ``toy`` or Hub model id ``checkpoint``, read (weights not loaded).

    Raises:
        UserError: nothing there, or a folder that is neither kind, or a damaged config (one line).
    """
    if str(checkpoint) == TOY_HEAD:
        path = toy_head_dir()
        if not (path / CONFIG_FILE).is_file():
            raise UserError(f"the toy LENS head is not installed ({path} missing): reinstall lens-seg")
    else:
        path = Path(checkpoint).expanduser()
    if not path.is_dir():
        if _HUB_ID.match(str(checkpoint)) and not path.exists():
            return _from_hub(str(checkpoint))
        raise UserError(f"checkpoint folder not found: {path} ({_NOT_FOUND_HINT})")
    config_path = path / CONFIG_FILE
    try:
        values = json.loads(config_path.read_text()) if config_path.is_file() else None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{config_path} is not valid JSON ({error}): the file is damaged") from None
    if isinstance(values, dict) and values.get("format") == MODEL_FORMAT:
        model = LensModel.from_pretrained(path)
        return Trained(path=path, kind="model", config=model.run_config(config_path), weights=path / MODEL_FILE,
                       step=int(values.get("step", -1)))
    if values is not None and not (isinstance(values, dict) and values.get("format") == RUN_FORMAT):
        raise UserError(f"{config_path} is neither a lens-train run nor a LENS model folder: {_NOT_FOUND_HINT}")
    config = read_run_config(path)  # a missing config.json: "PATH is not a lens-train run (config.json missing)"
    return Trained(path=path, kind="run", config=config, weights=path / MODEL_FILE, step=checkpoint_step(path))


def _from_hub(repo_id: str) -> Trained:
    try:
        model = LensModel.from_pretrained(repo_id)
    except UserError:
        raise
    except Exception as error:  # offline, no such repository, no access: huggingface_hub's own types
        raise UserError(f"checkpoint folder not found: {repo_id}, and it could not be fetched from the Hugging Face "
                        f"Hub ({type(error).__name__}): {_NOT_FOUND_HINT}") from None
    assert model.weights_file is not None
    return Trained(path=model.weights_file.parent, kind="model", config=model.run_config(repo_id),
                   weights=model.weights_file, step=int(model.config.get("step", -1)))


# ----------------------------------------------------------------------------- export


def export_model(run_dir: str | Path, out: str | Path, *, overwrite: bool = False, say=None) -> Path:
    """Write the model folder of the run in ``run_dir`` into ``out`` (whole or not at all); returns ``out``.

    Raises:
        UserError: not a run with a checkpoint, weights and marker of different steps, or ``out`` exists
            and is not empty (without ``overwrite``), or is the run folder itself (one line).
    """
    from safetensors import safe_open

    from .model_card import model_card
    from lens_core.files import folder_replaced_on_success

    out = Path(out).expanduser()
    if not Path(run_dir).expanduser().is_dir():
        raise UserError(f"run folder not found: {run_dir} (give a run folder written by lens-train)")
    trained = open_trained(run_dir)
    if trained.kind != "run":
        raise UserError(f"{run_dir} is already a model folder: copy it, or export the run it came from")
    if trained.step is None:
        raise UserError(f"{run_dir} holds no checkpoint yet: train it first (lens-train --out {run_dir})")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if out.resolve() == trained.path.resolve() or trained.path.resolve().is_relative_to(out.resolve()):
        raise UserError(f"--out {out} would replace the run folder {run_dir}: give a new folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} exists and is not empty: choose another --out or pass --overwrite")
    with safe_open(str(trained.weights), framework="pt") as f:
        weights_step = int((f.metadata() or {}).get("step", -1))
    if weights_step != trained.step:
        raise UserError(f"{run_dir}: {MODEL_FILE} is from step {weights_step} but its checkpoint says {trained.step} "
                        "(interrupted while saving): resume the run, or restore a copy")
    config = model_config_of(trained.config, step=trained.step, run_dir=trained.path)
    model = LensModel(config=config, weights_file=trained.weights, card=model_card(config, run_dir=trained.path))
    with folder_replaced_on_success(out) as tmp:
        model.save_pretrained(tmp)
    if say is not None:
        say(f"wrote {out} (step {trained.step} of {run_dir}); use it with lens-segment IMAGE TEXT --checkpoint {out}")
    return out
