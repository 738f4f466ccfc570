"""The fast path: every place where the toolkit reaches into torch, transformers, peft, trl, bitsandbytes or
galore-torch internals, one module each, switched by `--fast_path` through switchboard.py.

| # | switch | module | what is overridden | target, as pinned | why | installed at | same answer as the stock path: |
|---|---|---|---|---|---|---|---|
| 1 | rms_norm | rms_norm.py | `Gemma3RMSNorm.forward` of each norm (instance): one fused `rms_norm`; float32 output under fp16 | transformers 4.57 `Gemma3RMSNorm(dim, eps)`, torch `rms_norm` | ten element-wise kernels a norm, 157 norms; Gemma 3's residual stream overflows float16 (transformers issue 36822) | `installed` | tests/test_fast_path.py, tests/test_numerics.py (fp16) |
| 2-3 | lora_4bit | lora_4bit.py | peft `lora.bnb.Linear4bit.forward` of each layer (instance): one autograd node; double quantization's scales undone once (`float32_absmax` on each QuantState) | peft 0.21, bitsandbytes 0.50 (`torch.ops.bitsandbytes.dequantize_4bit`, QuantState fields) | one node instead of several; the 4-bit weight dequantized once | `installed` | tests/test_fast_path.py, tests/test_gpu_real_shapes.py |
| 4 | varlen_attention | varlen_attention.py | an attention function registered with transformers under its own name and selected on the model's config: packed rows through `torch.ops.aten._flash_attention_forward` / `_efficient_attention_forward` (private); a forward pre-hook on the model under the LM head that passes Gemma 3's "masks made already" dict of Nones where the kernels serve every layer | transformers 4.57 `AttentionInterface`, `AttentionMaskInterface`; the two aten schemas | a packed row's records attend only to themselves, without a row x row mask; transformers' two masks, built every step (13 ms of a CPU step where they are built; the skip itself not measured on a GPU) | `installed` | tests/test_fast_path.py, tests/test_gpu_real_shapes.py |
| 5 | chunked_loss | chunked_loss.py | the causal LM's `forward` (instance): the loss from the hidden states in vocabulary chunks | transformers 4.57 Gemma 3 (`model.model`, a plain Linear `lm_head`) | the 262k-vocabulary logits are a step's largest tensor | `installed` | tests/test_numerics.py |
| 6 | cudnn_off | cudnn_attention.py | `torch.backends.cuda.enable_cudnn_sdp(False)` while training, then as before | torch >= 2.5 | cuDNN attention plans each batch shape on the CPU, about 18 ms a call | `installed` | speed only (the other SDPA kernels answer the same) |
| 7a | galore_8bit (fix) | galore_8bit.py | `GaLoreAdamW8bit.__init__`: bitsandbytes' `Optimizer2State` bound by keyword | galore-torch 1.0, bitsandbytes 0.50 (`optim_bits`, `is_paged`) | galore-torch's positional settings read as `max_unorm=100, skip_zeros=True` | `galore_class` | tests/test_galore_optimizer.py |
| 7b | galore_no_sync (fix) | galore_no_sync.py | `GaLoreAdamW8bit.step`: a copy of it whose `torch.cuda.synchronize` does nothing (nothing global swapped) | galore-torch 1.0 | a GPU sync after every weight, about 340 a step; on the CPU the stock step fails (no CUDA) | `galore_class` | tests/test_galore_optimizer.py |
| 8 | galore_resume (fix) | galore_resume.py | `torch.serialization.safe_globals([GaLoreProjector])` while training | torch >= 2.5 | the Trainer resumes with `weights_only=True`, which refuses GaLore's projector | `installed` | tests/test_kill_resume.py |
| 9 | one_gpu (fix) | one_gpu.py | the trainer's `TrainingArguments._n_gpu = 1` under plain python with several GPUs, as the Trainer does for model parallelism | transformers 4.57 `n_gpu` | the Trainer would use nn.DataParallel, which fails with 4-bit models | `installed`; checked in `training.settings` | tests/test_distributed.py |
| 10 | compile_layers | compiled_layers.py | each `Gemma3DecoderLayer.forward` (instance): `torch.compile(dynamic=True)` in training mode; the compiler's settings held while training; a callback says what the first step waits for and how long it took | transformers 4.57; torch >= 2.6 | a step of small batches waits on the CPU's kernel launches | `installed` (with --compile_layers) | tests/test_compiled_layers.py |
| 11 | offload | offload.py | each decoder layer's `_gradient_checkpointing_func`, set at `on_train_begin`: checkpointed inputs in pinned CPU memory; with compiled layers the forward pass runs their training graph (one graph per kind of layer) | transformers 4.57 `GradientCheckpointingLayer` | the checkpointed inputs (1.6 GiB at 32k tokens) | `installed` (with --offload_activations) | tests/test_compiled_layers.py |
| 12 | skip_train | skip_train.py | the model's `train` (instance): returns at once while every module trains | torch `nn.Module.train` | a walk over about 2,300 modules a step | `installed` | tests/test_fast_path.py |
| 13 | flops_once | flops_once.py | the causal LM's `floating_point_ops` (instance): the parameter count taken once | transformers 4.57 | `num_parameters` visits every parameter every step | `installed` | tests/test_fast_path.py |
| 15 | kbit_embeddings | kbit_embeddings.py | trl's `prepare_model_for_kbit_training` while the QLoRA script builds its SFTTrainer under bf16: bf16 embeddings hidden from its float32 cast | trl 0.8.6, peft 0.21 | the cast there and back holds the 262k-row embedding twice: a whole run's peak at small budgets | `building_trainer` | tests/test_model_loading.py |
| 16 | trainable_grads | trainable_grads.py | the accelerator's `clip_grad_norm_` and the model's `zero_grad` (instances): over a list of the trainable parameters taken at the start | transformers 4.57's training loop, accelerate 1.x; one process or DDP | the Trainer walks every parameter twice a step, and QLoRA's frozen base never has a gradient | `installed` | tests/test_step_overhead.py |

Override 14 (the MLP over its tokens in pieces) cost speed and left the run's peak: it lives in bench/ alone.

Both classes of Gemma 3: every override is proven on the multimodal one too (gemma-3-4b and up,
`Gemma3ForConditionalGeneration`), none switched off for it: tests/test_multimodal.py runs each same-answer test on a
small model of that class, tests/test_fast_path.py trains its smoke runs with `all` and `none` to the same loss, and
tests/test_gpu_real_shapes.py checks 270m's and 4b's real shapes on a GPU. What the class needed: `varlen_attention` sets
the text config's attention alone (set on the top config, transformers passes it down to the vision tower's), and
`chunked_loss` reads the softcap from the text config and names `logits_to_keep`, which the class's generation passes.

`--fast_path none` turns every speed override off (the stock trl/peft/transformers path) and keeps the four fixes,
without which the stock path trains GaLore wrongly, cannot run it on the CPU, cannot resume it, or cannot start on
several GPUs under plain python; `none,-galore_8bit` drops a fix too. tests/test_fast_path.py trains both scripts' smoke runs with `all` and
with `none` to the same loss.
"""
