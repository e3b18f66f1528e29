"""A run's ``config.json`` as a typed, versioned record: :class:`RunConfig`.

``lens-train`` writes it once, when a run starts (:func:`write_run_config`); ``lens-eval``,
``lens-segment``, ``lens-chat``, ``--resume`` and the reproduction read it back
(:func:`read_run_config`) and use its attributes. The JSON keys are those of format 1, the
only format so far, so every run folder written before this module existed still loads::

    format, format_version, preset, preset_description, model (LensConfig), train (TrainConfig),
    layer, sam, identity_hash, stores (one record per store read), cli, device, precision,
    versions, created, warm_start

Reading checks ``format`` (a lens-train run) and ``format_version``: a version this code
does not know (a newer lens-seg wrote it) is a one-line :class:`UserError` naming the file
and the fix. A change to what a run records bumps :data:`RUN_FORMAT_VERSION` and teaches
:meth:`RunConfig.from_dict` to read the older versions.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lens_core.files import write_text_atomically

from lens_core.config import LensConfig

from .config import TrainConfig
from ..errors import UserError

__all__ = ["CONFIG_FILE", "RUN_FORMAT", "RUN_FORMAT_VERSION", "RunConfig", "StoreRecord", "read_run_config",
           "write_run_config"]

CONFIG_FILE = "config.json"
RUN_FORMAT = "lens-train-run"
#: the format this code writes; it reads this one and every older one
RUN_FORMAT_VERSION = 1


@dataclass(frozen=True)
class StoreRecord:
    """What a run records about one store it was trained on.

    Attributes:
        url: where the store was (path or URL).
        identity_hash, manifest_hash: which backbone cached it, and from which manifest.
        spec: the dataset split spec it caches (``refcoco:train``), if recorded.
        layers: the MLLM layers it holds.
        num_queries, num_valid_queries: its queries, and those not skipped by the build.
        identity: the backbone identity the store recorded (``lens_cache.identity``), as is: the
            record a live backbone must match (``lens-segment``, ``lens-chat``).
    """

    url: str
    identity_hash: str
    manifest_hash: str
    spec: str | None
    layers: tuple[int, ...]
    num_queries: int
    num_valid_queries: int
    identity: Mapping[str, Any]

    @classmethod
    def of(cls, store: Any) -> StoreRecord:
        """The record of an open ``lens_cache.store.FeatureStore``."""
        return cls(url=store.url, identity_hash=store.identity_hash, manifest_hash=store.manifest_hash,
                   spec=store.attrs.get("spec"), layers=tuple(int(v) for v in store.layers),
                   num_queries=int(store.num_queries), num_valid_queries=int(len(store.valid_query_ids())),
                   identity=store.identity)

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "identity_hash": self.identity_hash, "manifest_hash": self.manifest_hash,
                "spec": self.spec, "layers": list(self.layers), "num_queries": self.num_queries,
                "num_valid_queries": self.num_valid_queries, "identity": dict(self.identity)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> StoreRecord:
        _check_keys("a record of its stores", values, cls)
        return cls(**{**values, "layers": tuple(int(v) for v in values["layers"])})


@dataclass(frozen=True)
class RunConfig:
    """Everything a run folder says about how its model was made (``RUN_DIR/config.json``).

    Attributes:
        preset, preset_description: the preset the run started from (name or JSON stem).
        model, train: the LensConfig and TrainConfig it trained with (preset + overrides).
        layer: the cached MLLM layer it read.
        sam: the ``build_sam`` spec of the SAM its stores were cached with (``tiny``, ``toy``,
            ``vit_h:PATH``).
        identity_hash: the backbone identity of its stores (all share it).
        stores: one :class:`StoreRecord` per store, in the order given.
        cli: how it was started (``{"argv": [...]}`` or ``{"reproduce": NAME}``).
        device, precision: where and how it trained (``cuda``, ``bf16``).
        versions: ``{"torch": ..., "lens": ...}`` of the code that trained it.
        created: when it started (``%Y-%m-%dT%H:%M:%S%z``).
        warm_start: what the head was initialised from (``{"requested", "used", ...}``); None
            only before :func:`lens_train.training.trainer.train` has decided it.
        format_version: the format of the file it was read from (:data:`RUN_FORMAT_VERSION`
            for a new run).
    """

    preset: str
    model: LensConfig
    train: TrainConfig
    layer: int
    sam: str
    identity_hash: str
    stores: tuple[StoreRecord, ...]
    device: str
    precision: str
    created: str
    preset_description: str = ""
    cli: Mapping[str, Any] = field(default_factory=dict)
    versions: Mapping[str, str] = field(default_factory=dict)
    warm_start: Mapping[str, Any] | None = None
    format_version: int = RUN_FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, keys in the order format 1 has always written them."""
        values = {
            "format": RUN_FORMAT,
            "format_version": self.format_version,
            "preset": self.preset,
            "preset_description": self.preset_description,
            "model": self.model.to_dict(),
            "train": self.train.to_record(),
            "layer": self.layer,
            "sam": self.sam,
            "identity_hash": self.identity_hash,
            "stores": [store.to_dict() for store in self.stores],
            "cli": dict(self.cli),
            "device": self.device,
            "precision": self.precision,
            "versions": dict(self.versions),
            "created": self.created,
        }
        if self.warm_start is not None:
            values["warm_start"] = dict(self.warm_start)
        return values

    def to_json(self) -> str:
        """The text of ``config.json`` (2-space indent, a final newline), as lens-train has always written it."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str | Path = CONFIG_FILE) -> RunConfig:
        """Read the JSON form; ``source`` names the file in the errors.

        Raises:
            UserError: not a lens-train run config, a format version this code does not read,
                a missing or unknown key, or a model/training setting that does not validate.
        """
        if not isinstance(values, Mapping) or values.get("format") != RUN_FORMAT:
            raise UserError(f"{source} is not a lens-train run config")
        version = values.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise UserError(f"{source} has format_version {version!r}, which no lens-train writes: the file is "
                            "damaged; train the run again into a new --out")
        if version > RUN_FORMAT_VERSION:
            versions = values.get("versions")
            wrote = versions.get("lens") if isinstance(versions, Mapping) else None
            raise UserError(f"{source} is run format {version}, newer than this lens-seg reads (format "
                            f"{RUN_FORMAT_VERSION}): read it with the lens-seg that trained it"
                            + (f" ({wrote})" if wrote else "") + " or upgrade this one")
        body = {key: value for key, value in values.items() if key != "format"}
        _check_keys(str(source), body, cls)
        try:
            return cls(**{
                **body,
                "model": LensConfig.from_dict(body["model"]),
                "train": TrainConfig.from_dict(body["train"]),
                "layer": int(body["layer"]),
                "stores": tuple(StoreRecord.from_dict(store) for store in body["stores"]),
            })
        except UserError as error:
            raise UserError(f"{source}: {error}") from None
        except (TypeError, ValueError) as error:
            raise UserError(f"{source}: {' '.join(str(error).split())}: the file is damaged; train the run "
                            "again into a new --out") from None


def _check_keys(what: str, values: Mapping[str, Any], cls: type) -> None:
    """Refuse a record with missing required keys or keys its format does not have (one line)."""
    if not isinstance(values, Mapping):
        raise UserError(f"{what} is not a JSON object: the file is damaged; train the run again into a new --out")
    known = {f.name: f for f in dataclasses.fields(cls)}
    required = {name for name, f in known.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing, unknown = sorted(required - set(values)), sorted(set(values) - set(known))
    if missing or unknown:
        parts = ([f"lacks {', '.join(missing)}"] if missing else []) + (
            [f"has unknown {', '.join(unknown)}"] if unknown else [])
        raise UserError(f"{what} {' and '.join(parts)} (run format {RUN_FORMAT_VERSION}): the file is damaged "
                        "or was written by another program")


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The :class:`RunConfig` of the run in ``run_dir``.

    Raises:
        UserError: ``run_dir`` holds no ``config.json``, or one that is not a run config this
            code reads (see :meth:`RunConfig.from_dict`).
    """
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} is not a lens-train run ({CONFIG_FILE} missing)")
    try:
        values = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error}): the file is damaged; train the run again "
                        "into a new --out") from None
    return RunConfig.from_dict(values, source=path)


def write_run_config(run_dir: str | Path, config: RunConfig) -> Path:
    """Write ``config`` as ``run_dir/config.json`` (atomically: a reader sees the old file or the new one)."""
    path = Path(run_dir) / CONFIG_FILE
    write_text_atomically(path, config.to_json())
    return path
