"""Peak memory of one stage-2 training step, counted on the CPU.

The step is the trainer's (:func:`lens_train.training.trainer.forward_backward`, clipping as the
preset says, AdamW's update) on a batch shaped like the cache (:func:`synthetic_batch`), run for
real on the CPU while :class:`LiveBytes` adds up the bytes of the tensor storages alive at each
moment; at the peak it says which were parameters, buffers, gradients, AdamW's state, and the
rest (the batch, activations kept for the backward, temporaries). At the real dimensions (a
0.4 B-parameter head at d=4096, SAM ViT-H's decoder) a step takes minutes on two cores, but no GPU.
(Torch's fake tensors would count without computing, but the keypoint selection depends on the
heatmap's values, which fake tensors do not have.)

What the count is, and is not:

- it is the tensors' bytes, the figure ``torch.cuda.max_memory_allocated`` reports; the CUDA
  context (about 0.5 GB), cuBLAS workspaces and the caching allocator's rounding come on top
  (:data:`CUDA_OVERHEAD_BYTES` is the allowance :meth:`MemoryEstimate.fits` adds);
- kernels that allocate differently on CUDA (attention's saved statistics, bf16 autocast's op
  lists, AdamW's ``foreach`` temporaries, asked for explicitly here as CUDA's default) are counted
  in their CPU form. ``make bench-gpu`` compares the count with a measured ``max_memory_allocated``
  on the first GPU lent.
- two steps are run: the first creates AdamW's state, the second runs with it (the steady
  state); the peak is the larger of the two.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from lens_core import Lens

from .data import Batch
from .presets import Preset

#: What a CUDA process holds besides its tensors (context, cuBLAS/cuDNN workspaces, allocator rounding):
#: an allowance, not a measurement; ``make bench-gpu`` measures it.
CUDA_OVERHEAD_BYTES = int(1.0 * 2**30)
#: About the length of BOS, LLaVA-1.5's system prompt and "USER:" with its tokenizer (what the head reads
#: before the image when the preset's ``head_input`` is ``full_sequence``; ``lens-cache prompt --mllm
#: llava-hf/llava-1.5-7b-hf`` prints the exact count for a real tokenizer).
LLAVA_PREFIX_TOKENS = 35
#: Kinds of memory reported: what the model holds, the gradients, AdamW's state, and the rest (the batch,
#: activations saved for the backward, temporaries).
KINDS = ("parameters", "buffers", "gradients", "optimizer", "activations")


@dataclass(frozen=True)
class StepShape:
    """The inputs of one micro-batch: B queries, each with its image's states, its text and its mask."""

    batch_size: int
    text_len: int = 40
    prefix_len: int = LLAVA_PREFIX_TOKENS
    original_size: tuple[int, int] = (480, 640)
    image_tokens: int = 576


def synthetic_batch(shape: StepShape, *, hidden_size: int, sam_channels: int, dtype: torch.dtype,
                    device: torch.device | str = "cpu", seed: int = 0) -> Batch:
    """A :class:`Batch` of random features shaped as the cache hands them to the model (features in
    ``dtype``, masks uint8 at the original size)."""
    g = torch.Generator().manual_seed(seed)
    b, h, w = shape.batch_size, *shape.original_size
    scale = 1024 / max(h, w)
    input_size = (int(h * scale + 0.5), int(w * scale + 0.5))

    def features(*size: int) -> torch.Tensor:  # float16 in the store, the training dtype on the device
        return torch.randn(*size, generator=g).half().to(device, dtype)

    return Batch(
        image_states=features(b, shape.image_tokens, hidden_size),
        text_states=features(b, shape.text_len, hidden_size),
        text_lengths=torch.full((b,), shape.text_len, device=device),
        sam_embeddings=features(b, sam_channels, 64, 64),
        gts=[(torch.rand(h, w, generator=g) > 0.7).to(torch.uint8).to(device) for _ in range(b)],
        original_sizes=torch.tensor([[h, w]] * b), input_sizes=torch.tensor([input_size] * b),
        query_ids=torch.arange(b), store_indices=torch.zeros(b, dtype=torch.long),
        tasks=["referring"] * b, datasets=["synthetic"] * b, is_sentence=torch.zeros(b, dtype=torch.bool),
        prefix_states=features(b, shape.prefix_len, hidden_size) if shape.prefix_len else None,
    )


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training step at its peak, by kind (:data:`KINDS`), and in all."""

    preset: str
    batch_size: int
    precision: str
    peak_bytes: int
    by_kind: dict[str, int]
    trainable_parameters: int

    def fits(self, gpu_bytes: float) -> bool:
        """Whether the step fits a GPU of ``gpu_bytes`` with :data:`CUDA_OVERHEAD_BYTES` on top."""
        return self.peak_bytes + CUDA_OVERHEAD_BYTES <= gpu_bytes


def measure_step_memory(preset: Preset, model: Lens, shape: StepShape, *, steps: int = 2,
                        skip_compute: bool = False) -> MemoryEstimate:
    """Peak bytes of ``steps`` training steps of ``model`` (built for ``preset`` and cast for training,
    on the CPU) on batches of ``shape``, counted by :class:`LiveBytes` (``skip_compute``: its products
    not computed, for the real dimensions in bfloat16, which a CPU without bf16 instructions multiplies
    at about 1 GFLOP/s)."""
    from .trainer import forward_backward, gradient_norm

    train = preset.train
    params = model.trainable_parameters()
    dtype = params[0].dtype  # the features follow the model (bfloat16 under bf16-pure)
    optimizer = torch.optim.AdamW(params, lr=train.lr, betas=train.betas, weight_decay=train.weight_decay,
                                  foreach=True)
    with LiveBytes(model.parameters(), model.buffers(), skip_compute=skip_compute) as live:
        gradients: set[int] = set()  # every gradient storage's serial (the address of a freed one is reused)
        hooks = [p.register_post_accumulate_grad_hook(lambda p: gradients.add(live.serial(p.grad))) for p in params]
        for step in range(steps):
            batch = synthetic_batch(shape, hidden_size=model.config.hidden_size,
                                    sam_channels=model.config.prompt_dim, dtype=dtype, seed=step)
            forward_backward(model, batch, train, _autocast(train.precision))
            gradient_norm(params, train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del batch
        for hook in hooks:
            hook.remove()
        kinds = {"parameters": {live.serial(p) for p in model.parameters()},
                 "buffers": {live.serial(b) for b in model.buffers()}, "gradients": gradients,
                 "optimizer": {live.serial(t) for state in optimizer.state.values() for t in state.values()
                               if isinstance(t, torch.Tensor) and t.dim() > 0}}
    by_kind = {kind: sum(n for serial, n in live.at_peak.items() if serial in serials)
               for kind, serials in kinds.items()}
    by_kind["activations"] = live.peak - sum(by_kind.values())
    return MemoryEstimate(preset=preset.name, batch_size=shape.batch_size, precision=train.precision,
                          peak_bytes=live.peak, by_kind=by_kind, trainable_parameters=sum(p.numel() for p in params))


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensor storages alive while it is active, and remembers which were alive
    at the peak (:attr:`at_peak`: serial -> bytes; :meth:`serial` names a live tensor's storage).

    A storage is counted from the first operator that returns it (or from entry, for the ``tracked``
    tensors given: parameters, buffers) until Python frees it (a weak reference's callback). Each
    storage gets a serial number when first seen: unlike its address, it is never reused.

    With ``skip_compute`` the matrix products and convolutions (:data:`_SKIPPABLE`, nearly all of a
    step's FLOPs) are not computed: each returns zeros of the shape, strides and dtype the real
    kernel would (found by running it on the meta device). Lifetimes, and so the count, are the real
    step's; values are not (the keypoints that a zero heatmap selects are not a trained model's).
    """

    def __init__(self, *tracked, skip_compute: bool = False):
        super().__init__()
        self.skip_compute = skip_compute
        self.peak = 0
        self.at_peak: dict[int, int] = {}
        self._live: dict[int, int] = {}  # serial -> bytes
        self._serials: dict[int, int] = {}  # address -> serial, for live storages
        self._refs: dict[int, weakref.ref] = {}
        self._total = self._next = 0
        for tensors in tracked:
            for tensor in tensors:
                self._add(tensor)

    def serial(self, tensor: torch.Tensor) -> int:
        """The serial number of ``tensor``'s storage (seen before, still alive)."""
        return self._serials[_key(tensor)]

    def _add(self, tensor: torch.Tensor) -> None:
        key = _key(tensor)
        if key in self._serials:
            return
        storage = tensor.untyped_storage()
        serial = self._next = self._next + 1
        self._serials[key], self._live[serial] = serial, storage.nbytes()
        self._total += storage.nbytes()
        self._refs[serial] = weakref.ref(storage, lambda _, key=key, serial=serial: self._free(key, serial))
        if self._total > self.peak:
            self.peak, self.at_peak = self._total, dict(self._live)

    def _free(self, key: int, serial: int) -> None:
        self._total -= self._live.pop(serial, 0)
        self._refs.pop(serial, None)
        if self._serials.get(key) == serial:
            del self._serials[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.skip_compute and func in _SKIPPABLE:
            out = _zeros_like_result(func, args, kwargs or {})
        else:
            out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._add(tensor)
        return out


_aten = torch.ops.aten
#: The operators :class:`LiveBytes` skips with ``skip_compute``: matrix products, convolutions, attention.
_SKIPPABLE = {_aten.mm.default, _aten.bmm.default, _aten.addmm.default, _aten.baddbmm.default,
              _aten.convolution.default, _aten.convolution_backward.default,
              _aten._scaled_dot_product_flash_attention_for_cpu.default,
              _aten._scaled_dot_product_flash_attention_for_cpu_backward.default}


def _zeros_like_result(func, args, kwargs):
    """What ``func`` would return, as zero-filled tensors (shapes and strides from the meta device)."""
    to_meta = lambda value: value.to("meta") if isinstance(value, torch.Tensor) else value  # noqa: E731
    result = func(*tree_map(to_meta, args), **tree_map(to_meta, kwargs))
    return tree_map(lambda m: torch.empty_strided(m.shape, m.stride(), dtype=m.dtype).zero_()
                    if isinstance(m, torch.Tensor) else m, result)


def _key(tensor: torch.Tensor) -> int:
    """One storage's identity (the C++ object's address), the same for every tensor viewing it."""
    return tensor.untyped_storage()._cdata


def _autocast(precision: str) -> contextlib.AbstractContextManager:
    """The training forward's context on a GPU, in its CPU form: bf16 autocast for "bf16" (float32 master
    weights), none for "bf16-pure" (the model itself is bfloat16) and "fp32"."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()
