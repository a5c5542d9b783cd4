"""PEFT adapters from the spec: the one LoRA config every recipe uses (SFT, reward model, DPO,
GRPO), the SFT methods' wrappers (LoRA/QLoRA, prompt tuning) and the 4-bit base QLoRA trains on."""

from __future__ import annotations

from typing import Any

from forgeline_operator.api.finetune_job import LoraSettings, PromptTuningSettings


def lora_config(lora: LoraSettings | None, task: str):  # noqa: ANN201 - peft.LoraConfig or None
    """PEFT LoRA config from spec.lora (None when there are no LoRA settings: train the whole model).
    task: CAUSAL_LM, or SEQ_CLS for a reward model's scalar head."""
    if lora is None:
        return None
    from peft import LoraConfig

    targets = "all-linear" if lora.target_modules == ["all-linear"] else lora.target_modules
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias=lora.bias,
        task_type=task,
    )


def load_base(spec: Any, base_dir: str, device: Any):  # noqa: ANN201 - a transformers model
    """The SFT base model on `device`; for qlora quantised to 4 bits (bitsandbytes) and prepared
    for k-bit training."""
    import torch
    from transformers import AutoModelForCausalLM

    if spec.method != "qlora":
        return AutoModelForCausalLM.from_pretrained(base_dir).to(device)
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    q = spec.quantization
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
    )
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=bnb, device_map={"": str(device)}
    )
    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=spec.training.gradient_checkpointing
    )


def wrap(spec: Any, model: Any, base_dir: str):  # noqa: ANN201 - a PeftModel, or the model as is
    """The SFT method's PEFT wrapper: LoRA (lora, qlora; defaults when spec.lora is unset), prompt
    tuning, or none (full)."""
    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

    if spec.method in ("lora", "qlora"):
        return get_peft_model(model, lora_config(spec.lora or LoraSettings(), "CAUSAL_LM"))
    if spec.method == "prompt-tuning":
        pt = spec.prompt_tuning or PromptTuningSettings()
        init = PromptTuningInit.TEXT if pt.init_text else PromptTuningInit.RANDOM
        return get_peft_model(
            model,
            PromptTuningConfig(
                task_type="CAUSAL_LM",
                num_virtual_tokens=pt.num_virtual_tokens,
                prompt_tuning_init=init,
                prompt_tuning_init_text=pt.init_text,
                tokenizer_name_or_path=base_dir if pt.init_text else None,
            ),
        )
    return model


def cast_as_published(model: Any, dtype_name: str) -> None:
    """What the QLoRA paper's training script (qlora.py) does after get_peft_model: the adapters in
    the compute dtype, norms in fp32, and the embeddings and head (which prepare_model_for_kbit_training
    made fp32) back in the compute dtype."""
    import torch

    dtype = getattr(torch, dtype_name)
    for name, param in model.named_parameters():
        frozen_fp32_io = param.dtype == torch.float32 and ("lm_head" in name or "embed_tokens" in name)
        if param.requires_grad or frozen_fp32_io:
            param.data = param.data.to(dtype)


def trained_dtype(model: Any) -> str | None:
    """The dtype the trained weights are in (for metrics.json), as measured, not as asked."""
    dtypes = {str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad}
    return ",".join(sorted(dtypes)) or None


def count_4bit(model: Any) -> int:
    """Linear layers held in 4 bits (QLoRA's base)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
