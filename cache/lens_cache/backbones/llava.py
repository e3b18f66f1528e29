"""LLaVA-1.5 (transformers ``LlavaForConditionalGeneration``) as a frozen LENS backbone.

How the states are computed (and why they equal a plain forward's ``hidden_states``):

- **Prompt.** ``{system} USER: <image>\\n{question} ASSISTANT:`` (LLaVA-1.5's vicuna_v1
  template). Token ids are those ``LlavaProcessor`` produces (``<image>`` repeated once
  per image token, then the tokenizer; checked at construction); image tokens are
  found with ``input_ids == config.image_token_id``, never by position.
- **Prefix sharing.** Everything up to the last image token (BOS, system prompt,
  ``USER:``, 576 image tokens) is the same for every question, and a causal decoder's
  states there cannot depend on what follows. So the prefix of a batch of images runs
  once, filling a KV cache (:class:`~transformers.DynamicCache`); then the suffixes of
  all questions run against that cache, its rows gathered per question. Suffixes are
  right-padded: under the causal mask a valid token never attends to a later (padding)
  position, and positions continue from the prefix length, so valid rows are exact.
- **Early stop.** Forward hooks on ``language_model.layers[k - 1]`` record the raw output
  of each cached layer ``k`` (= ``hidden_states[k]``); the hook of the deepest one raises
  :class:`~lens_cache.backbones.layer_capture.StopForward`, so deeper layers and the final RMSNorm never run. The model is
  never modified (the hooks are removed afterwards), nothing gets gradients.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from transformers import AutoProcessor, DynamicCache, LlavaForConditionalGeneration, PretrainedConfig

from lens_cache.errors import BadSampleError, UsageError
from lens_cache.files import sha256_file

from .runtime import dtype_name, resolve_device, resolve_dtype
from .geometry import sam_frame
from .layer_capture import decoder_layer_state_dict, forward_until, plain, tensors_fingerprint
from .mllm import MllmStates, UnsupportedMllmError, load_mllm_config

#: LLaVA-1.5's conversation template (vicuna_v1); ``<image>`` stands for the image tokens.
VICUNA_V1_TEMPLATE = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions. "
    "USER: <image>\n{question} ASSISTANT:"
)
#: The question for a referring phrase (short query); sentences are asked as they are.
REFERRING_QUESTION_TEMPLATE = "Can you segment the {text} in this image?"

BACKBONE_NAME = "llava-1.5"
_IMAGE_PLACEHOLDER = "<image>"

# Config keys that describe where/how a checkpoint was loaded, not what it computes.
_VOLATILE_CONFIG_KEYS = frozenset(
    {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "_attn_implementation",
     "_attn_implementation_autoset", "_commit_hash", "architectures", "output_hidden_states",
     "output_attentions", "return_dict", "use_cache"}
)


def config_hash(config: PretrainedConfig) -> str:
    """sha256 of the LLaVA config (text + vision + projector settings), sorted keys, volatile keys dropped.

    Hashing the weights of a 14 GB checkpoint would be too slow; see :func:`weights_fingerprint`.
    """

    def stable(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: stable(v) for k, v in value.items() if k not in _VOLATILE_CONFIG_KEYS}
        if isinstance(value, (list, tuple)):
            return [stable(v) for v in value]
        return value

    text = json.dumps(stable(config.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def weights_fingerprint(model: LlavaForConditionalGeneration, samples: int = 4096) -> str:
    """A cheap fingerprint of the weights: ~4k strided values of a few tensors, hashed.

    Values are rounded to bfloat16 first, so a float16 checkpoint loaded as bfloat16 (GPU)
    or float32 (CPU) gives the same fingerprint.
    """
    lm = model.model.language_model
    tensors = [
        lm.embed_tokens.weight,
        lm.layers[0].self_attn.q_proj.weight,
        lm.layers[len(lm.layers) // 2].mlp.down_proj.weight,
        lm.layers[-1].mlp.down_proj.weight,
        model.model.multi_modal_projector.linear_1.weight,
        next(model.model.vision_tower.parameters()),
    ]
    return tensors_fingerprint(tensors, samples)


class LlavaBackbone:
    """A frozen LLaVA-1.5 that returns its layer-``k`` hidden states (see module docstring).

    Args:
        model: the LLaVA model; must be frozen by the caller (eval, no grads) — the
            loaders here do that. Its device and dtype are used as they are.
        processor: its ``LlavaProcessor`` (tokenizer + CLIP image processor).
        name_or_path: recorded in the identity.
        layers: cached layers, ``hidden_states`` indices in ``1..num_hidden_layers``.
        prompt_template: must contain ``<image>`` and ``{question}`` once each.
        question_template: the question for a short referring phrase (``{text}``).
        max_query_batch: most question suffixes run in one forward.
    """

    def __init__(
        self,
        model: LlavaForConditionalGeneration,
        processor: Any,
        *,
        name_or_path: str,
        layers: Sequence[int] = (14,),
        prompt_template: str = VICUNA_V1_TEMPLATE,
        question_template: str = REFERRING_QUESTION_TEMPLATE,
        max_query_batch: int = 32,
    ) -> None:
        self.model = model
        self.processor = processor
        self.name_or_path = name_or_path
        self.max_query_batch = max_query_batch
        self._lm = model.model.language_model
        text_config = model.config.text_config
        self.num_hidden_layers = int(text_config.num_hidden_layers)
        self.layers = tuple(sorted({int(k) for k in layers}))
        if not self.layers or self.layers[0] < 1 or self.layers[-1] > self.num_hidden_layers:
            raise UsageError(f"--layers must lie in 1..{self.num_hidden_layers} (hidden_states indices), got {tuple(layers)}")
        if prompt_template.count(_IMAGE_PLACEHOLDER) != 1 or prompt_template.count("{question}") != 1:
            raise UsageError("prompt_template must contain '<image>' and '{question}' exactly once each")
        self.prompt_template = prompt_template
        self.question_template = question_template
        self.hidden_size = int(text_config.hidden_size)
        self.image_token_id = int(model.config.image_token_id)
        self.device = model.device
        self.dtype = model.dtype
        self.num_image_tokens, reference_ids = self._processor_ids(self.question_for("object", is_sentence=False))

        prefix, suffix = self._split_ids(self.question_for("object", is_sentence=False))
        if prefix + suffix != reference_ids:  # see _split_ids: must hold for any tokenizer that splits on special tokens
            raise RuntimeError("tokenising the prompt with one <image> and expanding it differs from the processor's ids")
        self._prefix_ids = prefix
        # Positions of the image tokens inside the (question-independent) prefix.
        self._image_positions = torch.tensor(
            [i for i, t in enumerate(prefix) if t == self.image_token_id], device=self.device
        )
        self.identity: dict = {
            "backbone": BACKBONE_NAME,
            "name_or_path": name_or_path,
            "config_hash": config_hash(model.config),
            "weights_fingerprint": weights_fingerprint(model),
            "layers": list(self.layers),
            "hidden_size": self.hidden_size,
            "num_image_tokens": self.num_image_tokens,
            "compute_dtype": dtype_name(self.dtype),
            "prompt_template": prompt_template,
            "question_template": question_template,
        }

    # ----------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        layers: Sequence[int] = (14,),
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        **kwargs: Any,
    ) -> "LlavaBackbone":
        """Load a llava-hf checkpoint (local folder or HF-cache name), offline, never remote code.

        bfloat16 on CUDA, float32 on CPU unless ``dtype`` says otherwise.

        Raises:
            MllmCheckpointNotFoundError: no checkpoint there.
            UnsupportedMllmError: the checkpoint is not a LLaVA one.
        """
        config = load_mllm_config(name_or_path)
        if config.model_type != "llava":
            raise UnsupportedMllmError(f"{name_or_path} is not a LLaVA checkpoint (model_type {config.model_type!r})")
        dev = resolve_device(device)
        model = LlavaForConditionalGeneration.from_pretrained(
            name_or_path, dtype=resolve_dtype(dtype, dev), local_files_only=True
        )
        processor = AutoProcessor.from_pretrained(name_or_path, local_files_only=True)
        _complete_processor(processor, model.config)
        model.to(dev).eval().requires_grad_(False)
        return cls(model, processor, name_or_path=str(name_or_path), layers=layers, **kwargs)

    @classmethod
    def tiny(
        cls,
        *,
        layers: Sequence[int] = (14,),
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> "LlavaBackbone":
        """The tiny LLaVA built in code (see :mod:`.tiny_llava`)."""
        from .tiny_llava import build_tiny_llava

        dev = resolve_device(device)
        model, processor = build_tiny_llava(seed)
        model.to(device=dev, dtype=resolve_dtype(dtype, dev))
        return cls(model, processor, name_or_path="tiny", layers=layers, **kwargs)

    @classmethod
    def toy(
        cls,
        *,
        layers: Sequence[int] = (3,),
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        folder: str | Path | None = None,
        **kwargs: Any,
    ) -> "LlavaBackbone":
        """The project's toy LLaVA (``lens_cache.toy``), loaded from its shipped llava-hf folder.

        Loaded by :meth:`from_pretrained` like any checkpoint; its identity names it ``toy``
        (not the folder's path) and adds the sha256 of its weights file.
        """
        from lens_cache.toy import TOY_LLAVA_DIR, WEIGHTS_DIR

        path = Path(folder) if folder is not None else WEIGHTS_DIR / TOY_LLAVA_DIR
        if not (path / "model.safetensors").is_file():
            from .mllm import MllmCheckpointNotFoundError

            raise MllmCheckpointNotFoundError(
                f"toy LLaVA weights not found in {path}: check out the repository's cache/lens_cache/toy/weights "
                "or remake them with `lens-toy pretrain-llava` + `lens-toy export`")
        backbone = cls.from_pretrained(str(path), layers=layers, device=device, dtype=dtype, **kwargs)
        backbone.identity["name_or_path"] = "toy"
        backbone.identity["weights_sha256"] = sha256_file(path / "model.safetensors")
        return backbone

    # ------------------------------------------------------------------ prompt

    def question_for(self, text: str, is_sentence: bool) -> str:
        """The sentence itself for reasoning queries, else ``question_template`` with the phrase."""
        return text if is_sentence else self.question_template.format(text=text)

    def prompt_for(self, question: str) -> str:
        """The full prompt text with a single ``<image>`` placeholder."""
        return self.prompt_template.format(question=question)

    def num_text_tokens(self, question: str) -> int:
        """L_t: the number of tokens after the last image token."""
        return len(self._split_ids(question)[1])

    def _check_question(self, question: str) -> None:
        """Refuse a question the prompt cannot carry as plain text.

        A special token written in the text (``<image>``, ``</s>``, ...) is read by the
        tokeniser as that token, not as text: it would add image slots or end the turn.

        Raises:
            BadSampleError: the question holds one (a build skips that query and lists it).
        """
        image_tokens = {_IMAGE_PLACEHOLDER, self.processor.image_token}
        specials = image_tokens | set(self.processor.tokenizer.all_special_tokens)
        found = sorted(token for token in specials if token and token in question)
        if found:
            what = "the image token" if found[0] in image_tokens else "a special token of the tokeniser"
            shown = question if len(question) <= 80 else question[:77] + "..."
            raise BadSampleError(f"the text contains {found[0]!r}, {what}, not text: {shown!r}")

    def _split_ids(self, question: str) -> tuple[list[int], list[int]]:
        """Token ids of the prompt, split after the last image token: (prefix, suffix).

        ``LlavaProcessor`` repeats ``<image>`` once per image token in the text, then
        tokenises. A special token splits the text into independently tokenised pieces,
        so tokenising with ONE image token and repeating its id gives the same ids at a
        fraction of the cost (checked against the processor in ``__init__``).

        Raises:
            BadSampleError: the question holds a special token, or the prompt would not fit
                the MLLM's context (``max_position_embeddings``).
        """
        self._check_question(question)
        text = self.prompt_for(question).replace(_IMAGE_PLACEHOLDER, self.processor.image_token)
        ids = self.processor.tokenizer(text, add_special_tokens=True)["input_ids"]
        positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(positions) != 1:
            raise BadSampleError(f"expected one image token in the prompt, found {len(positions)}: {question!r}")
        at = positions[0]
        prefix, suffix = ids[:at] + [self.image_token_id] * self.num_image_tokens, ids[at + 1 :]
        context = int(self.model.config.text_config.max_position_embeddings)
        if len(prefix) + len(suffix) > context:
            raise BadSampleError(
                f"the prompt would be {len(prefix) + len(suffix)} tokens, more than the MLLM's context of {context}"
            )
        return prefix, suffix

    def _processor_ids(self, question: str) -> tuple[int, list[int]]:
        """(L_i, input ids) as the processor itself builds them for ``question`` and a blank image.

        L_i is checked against the vision tower's patch grid (576 for LLaVA-1.5).
        """
        vision = self.model.config.vision_config
        side = int(vision.image_size)
        inputs = self.processor(text=self.prompt_for(question), images=Image.new("RGB", (side, side)), return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        count = sum(t == self.image_token_id for t in ids)
        patches = (side // int(vision.patch_size)) ** 2
        expected = patches if self.model.config.vision_feature_select_strategy == "default" else patches + 1
        if count != expected:
            raise ValueError(f"the processor expands <image> to {count} tokens but the vision tower gives {expected}")
        return count, ids

    # ------------------------------------------------------------------ states

    def encode(self, images: Sequence[Image.Image], questions: Sequence[Sequence[str]]) -> list[MllmStates]:
        """Hidden states for a batch of images and the questions about each.

        ``images`` are given as the MLLM should see them (the combined extractor passes
        SAM's padded square); the processor resizes them to 336.

        Returns:
            one :class:`MllmStates` per image: layer -> (L_i, d) image states and, per
            question, layer -> (L_t, d) text states; float32 on the CPU.
        """
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} question lists")
        if not images:
            return []
        image_states, text_states = self._encode(images, questions)
        return [
            MllmStates(
                image_states={k: plain(v[b]) for k, v in image_states.items()},
                text_states=[{k: plain(v) for k, v in row.items()} for row in text_states[b]],
            )
            for b in range(len(images))
        ]

    @torch.inference_mode()
    def _encode(
        self, images: Sequence[Image.Image], questions: Sequence[Sequence[str]]
    ) -> tuple[dict[int, torch.Tensor], list[list[dict[int, torch.Tensor]]]]:
        suffixes = []
        for qs in questions:
            for q in qs:
                prefix, suffix = self._split_ids(q)
                if prefix != self._prefix_ids:
                    raise RuntimeError(f"the prompt prefix changed with the question {q!r}: prefix sharing would be wrong")
                suffixes.append(suffix)

        # 1) the shared prefix of every image, once, in one batch (same length: no padding).
        batch = len(images)
        pixel_values = self.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        prefix_ids = torch.tensor(self._prefix_ids, device=self.device).repeat(batch, 1)
        prefix_cache = DynamicCache(config=self.model.config)
        states = self._forward_until(
            input_ids=prefix_ids,
            pixel_values=pixel_values.to(self.device, self.dtype),
            past_key_values=prefix_cache,
            use_cache=True,
        )
        # One device-to-host copy per layer and batch (not per image or question).
        image_states = {k: v[:, self._image_positions].float().cpu() for k, v in states.items()}  # (B, L_i, d)

        # 2) every question's suffix against its image's cache rows, right-padded.
        owner = [b for b, qs in enumerate(questions) for _ in qs]
        text_states: list[list[dict[int, torch.Tensor]]] = [[] for _ in images]
        pad_id = self.processor.tokenizer.pad_token_id or 0  # any id: padded positions are never read
        deepest = self.layers[-1]
        for start in range(0, len(suffixes), self.max_query_batch):
            rows = range(start, min(start + self.max_query_batch, len(suffixes)))
            lengths = [len(suffixes[r]) for r in rows]
            ids = torch.full((len(rows), max(lengths)), pad_id, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : lengths[i]] = torch.tensor(suffixes[r])
            gather = torch.tensor([owner[r] for r in rows], device=self.device)
            # Indexing copies, so the prefix cache stays intact for the next chunk.
            cache = DynamicCache(
                ddp_cache_data=[(layer.keys[gather], layer.values[gather]) for layer in prefix_cache.layers[:deepest]],
                config=self.model.config,
            )
            states = self._forward_until(input_ids=ids.to(self.device), past_key_values=cache, use_cache=True)
            states = {k: v.float().cpu() for k, v in states.items()}  # (R, S, d)
            for i, r in enumerate(rows):
                text_states[owner[r]].append({k: v[i, : lengths[i]] for k, v in states.items()})
        return image_states, text_states

    def _forward_until(self, **inputs: Any) -> dict[int, torch.Tensor]:
        """Run ``model.model`` until the deepest cached layer; layer -> (B, S, d) raw layer outputs."""
        return forward_until(self.model.model, self._lm.layers, self.layers, **inputs)

    # --------------------------------------------------------------- dialogue

    def generate(
        self,
        image: Image.Image | None,
        prompt_text: str,
        max_new_tokens: int = 64,
        *,
        use_template: bool = True,
        **generate_kwargs: Any,
    ) -> str:
        """The MLLM's greedy answer (for dialogue and the agent's router / follow-ups).

        Args:
            image: shown as SAM's padded square (same geometry as the cache), or ``None``.
            prompt_text: the user's message; with ``use_template`` it is wrapped in the
                conversation template (``<image>\\n`` dropped when there is no image),
                else used verbatim (it must then contain ``<image>`` iff an image is given).
        Returns:
            the decoded new tokens, special tokens skipped, stripped.
        """
        if use_template:
            template = self.prompt_template if image is not None else self.prompt_template.replace(_IMAGE_PLACEHOLDER + "\n", "")
            text = template.format(question=prompt_text)
        else:
            text = prompt_text
        images = [sam_frame(image).padded_image()] if image is not None else None
        inputs = self.processor(text=text, images=images, return_tensors="pt").to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        generate_kwargs.setdefault("do_sample", False)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
        new_tokens = out[0, inputs["input_ids"].shape[1] :]
        return self.processor.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()

    # ------------------------------------------------------------- warm start

    @property
    def text_config(self) -> PretrainedConfig:
        """The decoder's config (heads, MLP size, RMSNorm eps, RoPE), for building a matching head."""
        return self.model.config.text_config

    @property
    def head_sizes(self) -> dict:
        """The ``LensConfig`` fields of a head made of this decoder's layers (see ``MllmBackbone``)."""
        config = self.text_config
        rope = getattr(config, "rope_parameters", None) or {}
        return {
            "hidden_size": int(config.hidden_size),
            "num_heads": int(config.num_attention_heads),
            "mlp_size": int(config.intermediate_size),
            "rms_norm_eps": float(config.rms_norm_eps),
            "rope_theta": float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
            # grouped-query attention only: LLaVA-1.5's records stay as they were (absent = multi-head)
            **({"num_key_value_heads": int(config.num_key_value_heads)}
               if getattr(config, "num_key_value_heads", None) not in (None, config.num_attention_heads) else {}),
        }

    def decoder_layer_state_dict(self, index: int) -> dict[str, torch.Tensor]:
        """CPU copy of ``language_model.layers[index]`` 's weights (LlamaDecoderLayer names).

        ``index`` is 0-based: layers 14 and 15 are the ones that read ``hidden_states[14]``
        and ``hidden_states[15]``, i.e. the LENS head's warm start for layer-14 features.
        """
        return decoder_layer_state_dict(self._lm.layers, index)


def _complete_processor(processor: Any, config: PretrainedConfig) -> None:
    """Fill the expansion settings that old llava-hf processor configs lack (patch_size=None).

    Newer llava-hf snapshots save ``patch_size=14, num_additional_image_tokens=1,
    vision_feature_select_strategy="default"``; older ones left the expansion to the
    model, which transformers 5 no longer does.
    """
    if getattr(processor, "patch_size", None) is None:
        processor.patch_size = config.vision_config.patch_size
        processor.num_additional_image_tokens = 1  # CLIP's CLS token
        processor.vision_feature_select_strategy = config.vision_feature_select_strategy
