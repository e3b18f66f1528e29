"""A LISA-style baseline: the MLLM itself fine-tuned to emit a ``[SEG]`` token whose state prompts SAM.

LISA (Lai et al., CVPR 2024) in miniature, as the LENS paper's Table 1 compares against it:

* a ``[SEG]`` token is added to the tokenizer and the embeddings are resized;
* the MLLM's language model is fine-tuned, with LoRA on its attention's ``q_proj`` and ``v_proj``
  (LISA's rank 8, alpha 16, dropout 0.05, through ``peft``) or fully (``lora_rank=0``);
  ``embed_tokens`` and ``lm_head`` are trained fully (LISA does, so ``[SEG]`` can be learned);
  the vision tower and projector stay frozen;
* the answer is "It is [SEG]." (one of LISA's answer templates); the last layer's hidden state at the
  position that predicts ``[SEG]`` (LISA's ``seg_token_mask`` shifted by one) goes through
  ``text_hidden_fcs`` (Linear-ReLU-Linear, LISA's) to one sparse prompt embedding of SAM's width;
* SAM's prompt encoder is frozen, its mask decoder trained, single-mask output;
* loss = text cross-entropy x 1.0 + mask BCE x 2.0 + Dice x 0.5 (LISA's weights), the mask losses as
  LENS computes them (:func:`lens_core.losses.segmentation_loss`, at the original image size).

Evaluation is LISA's: the answer is teacher-forced and the mask read from the ``[SEG]`` state.
Unlike LENS, this changes the MLLM's weights; :meth:`LisaStyle.merged_mllm` gives the fine-tuned
MLLM as a plain ``LlavaForConditionalGeneration`` for the general-ability benchmarks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lens_core.geometry import postprocess_masks
from lens_core.losses import segmentation_loss

SEG_TOKEN = "[SEG]"
#: One of LISA's answer templates (its ``ANSWER_LIST``); the toy's vocabulary has no "sure".
ANSWER = "It is [SEG]."
#: LISA's loss weights.
CE_WEIGHT, BCE_WEIGHT, DICE_WEIGHT = 1.0, 2.0, 0.5
#: LISA's LoRA: rank 8, alpha 16, dropout 0.05 on the language model's q_proj and v_proj.
LORA_ALPHA, LORA_DROPOUT = 16, 0.05
LORA_TARGETS = r".*language_model.*\.(q_proj|v_proj)"


def add_seg_token(model: Any, tokenizer: Any) -> int:
    """Add ``[SEG]`` as a special token, resize the embeddings (new row: the mean, transformers' default)."""
    if SEG_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [SEG_TOKEN]})
    model.resize_token_embeddings(len(tokenizer))
    return int(tokenizer.convert_tokens_to_ids(SEG_TOKEN))


class LisaStyle(nn.Module):
    """The fine-tuned MLLM, ``text_hidden_fcs`` and SAM's prompt encoder (frozen) and mask decoder.

    Args:
        mllm: a ``LlavaForConditionalGeneration`` whose tokenizer already holds ``[SEG]``
            (:func:`add_seg_token`); it is modified in place (that is the point of the baseline).
        seg_token_id: the id of ``[SEG]``.
        prompt_encoder, mask_decoder: SAM's.
        lora_rank: LoRA rank on q/v (LISA: 8); 0 fine-tunes the whole language model.
    """

    def __init__(self, mllm: Any, seg_token_id: int, prompt_encoder: nn.Module, mask_decoder: nn.Module, *,
                 lora_rank: int = 8) -> None:
        super().__init__()
        self.seg_token_id = int(seg_token_id)
        self.lora_rank = int(lora_rank)
        mllm.requires_grad_(False)
        if self.lora_rank > 0:
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(r=self.lora_rank, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                                target_modules=LORA_TARGETS, bias="none")
            mllm = get_peft_model(mllm, config)  # LoRA weights trainable, the rest frozen
        else:
            self._base(mllm).model.language_model.requires_grad_(True)
        base = self._base(mllm)
        base.get_input_embeddings().requires_grad_(True)
        base.get_output_embeddings().requires_grad_(True)
        self.mllm = mllm
        width = int(base.config.text_config.hidden_size)
        out = int(prompt_encoder.embed_dim)
        self.text_hidden_fcs = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, out),
                                             nn.Dropout(0.0))
        self.prompt_encoder = prompt_encoder.requires_grad_(False)
        self.mask_decoder = mask_decoder.requires_grad_(True)

    @staticmethod
    def _base(mllm: Any) -> Any:
        return mllm.get_base_model() if hasattr(mllm, "get_base_model") else mllm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                pixel_values: torch.Tensor, image_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text cross-entropy (mean over the supervised tokens) and low-res mask logits (B, 256, 256).

        Every row must hold ``[SEG]`` exactly once (teacher-forced answers, as LISA trains and validates).
        """
        out = self.mllm(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                        output_hidden_states=True)
        logits, targets = out.logits[:, :-1], labels[:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)
        # the state that predicts [SEG] (LISA's seg_token_mask = input_ids[:, 1:] == seg, padded at the end)
        predicts_seg = F.pad(input_ids[:, 1:] == self.seg_token_id, (0, 1), value=False)
        counts = predicts_seg.sum(1)
        if not bool((counts == 1).all()):
            raise ValueError(f"every row needs one {SEG_TOKEN} token, got counts {counts.tolist()}")
        states = out.hidden_states[-1][predicts_seg]  # (B, d), row order kept
        prompts = self.text_hidden_fcs(states.float()).unsqueeze(1)  # (B, 1, C)
        return ce, self.decode(prompts, image_embeddings)

    def decode(self, prompts: torch.Tensor, image_embeddings: torch.Tensor) -> torch.Tensor:
        """SAM's single-mask output for each row's prompt embedding: (B, 256, 256) logits."""
        _, dense = self.prompt_encoder(points=None, boxes=None, masks=None)
        image_pe = self.prompt_encoder.get_dense_pe()
        masks = []
        for b in range(prompts.shape[0]):
            low_res, _ = self.mask_decoder(image_embeddings=image_embeddings[b : b + 1].float(), image_pe=image_pe,
                                           sparse_prompt_embeddings=prompts[b : b + 1], dense_prompt_embeddings=dense,
                                           multimask_output=False)
            masks.append(low_res[:, 0])
        return torch.cat(masks)

    def loss(self, ce: torch.Tensor, low_res: torch.Tensor, gts: list[torch.Tensor],
             sizes: list[tuple[tuple[int, int], tuple[int, int]]]) -> dict[str, torch.Tensor]:
        """LISA's total loss; ``sizes`` holds each image's (input size in SAM's frame, original size)."""
        full = [postprocess_masks(low_res[b][None, None], *sizes[b])[0, 0] for b in range(low_res.shape[0])]
        seg = segmentation_loss(full, gts, dice_weight=DICE_WEIGHT, bce_weight=BCE_WEIGHT)
        return {"loss": CE_WEIGHT * ce + seg["seg"], "ce": ce, "dice": seg["dice"], "bce": seg["bce"]}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def merged_mllm(self) -> Any:
        """The fine-tuned MLLM as a plain model (LoRA merged into a copy; the module itself unchanged)."""
        import copy

        mllm = copy.deepcopy(self.mllm)
        if self.lora_rank > 0:
            mllm = mllm.merge_and_unload()
        return mllm.requires_grad_(False).eval()
