"""SmolLM2-135M-Instruct + LoRA on Rotten Tomatoes snippets, sentiment as generation.

"Review: <snippet>\nSentiment:" -> " positive" / " negative"; accuracy compares the
likelihood of the two label words. About 3 minutes on 2 CPU cores once its steps are
compiled (the persistent compilation cache keeps them; a first run also compiles).

  python train.py --config=configs/default.py --workdir=runs/default

`python train.py` with no --config runs this file.
"""

import ml_collections


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0  # model init (random init / adapters), dropout
    c.max_steps = 100  # optimizer steps
    c.log_every = 10  # train metrics interval (one host sync per interval)
    # JAX's persistent compilation cache: a restart, resume or sweep run loads its
    # compiled steps. 'auto' = FTLIB_CACHE/xla/<host>; a folder; '' = off.
    c.compilation_cache = "auto"

    c.model = ml_collections.ConfigDict()
    c.model.checkpoint = (
        "smollm2-135m-instruct"  # HF folder, .gguf file or shipped asset; '' = random init
    )
    c.model.tokenizer = ""  # tokenizer source for random init (same forms as checkpoint)
    # Architecture of a random-init model (ignored when a checkpoint is given).
    c.model.vocab_size = 0  # 0 = the tokenizer's size
    c.model.hidden_size = 576
    c.model.intermediate_size = 1536
    c.model.num_layers = 30
    c.model.num_heads = 9
    c.model.num_kv_heads = 3
    c.model.head_dim = 0  # 0 = hidden_size // num_heads
    c.model.rms_norm_eps = 1e-5
    c.model.rope_theta = 1e5
    c.model.tie_embeddings = True
    # Execution (pretrained models too).
    c.model.dtype = "float32"  # compute dtype ('bfloat16' on accelerators)
    c.model.param_dtype = "float32"  # storage dtype of params
    c.model.frozen_dtype = ""  # storage dtype of frozen params ('bfloat16' halves a LoRA base)
    # True: lax.scan over layers (compile time independent of depth); False: a Python
    # loop; None: a loop on GPU and on CPU up to 16 layers (faster steps there), else scan.
    c.model.scan_layers = ml_collections.FieldReference(None, field_type=bool)
    c.model.scan_unroll = (
        3  # layers per scan iteration: 3 runs ~1.5x faster on CPU, compiles in ~15 s
    )
    c.model.remat = "none"  # 'none' | 'full' | 'save_dots': per-block rematerialisation
    # Causal attention kernel: 'auto' (blocked on CPU; a flash kernel on GPU in bf16),
    # 'blocked' (any backend), 'cudnn' or 'pallas' (GPU flash attention).
    c.model.attention = "auto"

    c.peft = ml_collections.ConfigDict()
    c.peft.method = "lora"  # see ftlib.peft.METHODS; '+' composes ('lora+prompt')
    c.peft.freeze = ()  # regexes over param paths frozen first (e.g. 'embed/.*')
    c.peft.trainable = ()  # regexes made trainable before the method's own rules
    # Start from an adapter: a run's DIR/adapter, or an HF PEFT LoRA folder (set peft.lora
    # to match it: ftlib.hf.lora_options). '' = the method's own init.
    c.peft.init_adapter = ""
    c.peft.lora = ml_collections.ConfigDict()
    c.peft.lora.rank = 8
    c.peft.lora.alpha = 16.0  # scale = alpha / rank (alpha / sqrt(rank) with rslora)
    c.peft.lora.dropout = (
        0.0  # on the adapter input, training only (PEFT's default; masks cost ~25% of a CPU step)
    )
    c.peft.lora.rslora = False
    c.peft.lora.target_modules = r".*/(q|k|v|o|gate|up|down)_proj"  # module paths to adapt
    # DoRA: LoRA on the direction + a trainable magnitude per output feature.
    c.peft.dora = ml_collections.ConfigDict()
    c.peft.dora.rank = 8
    c.peft.dora.alpha = 16.0  # scale = alpha / rank (alpha / sqrt(rank) with rslora)
    c.peft.dora.dropout = 0.0  # on the adapter input, training only
    c.peft.dora.rslora = False
    c.peft.dora.target_modules = r".*/(q|k|v|o|gate|up|down)_proj"  # module paths to adapt
    # (IA)^3: learned scaling vectors (init 1) on activations.
    c.peft.ia3 = ml_collections.ConfigDict()
    c.peft.ia3.target_modules = r".*/(k|v|down)_proj"  # Linears whose activations are scaled
    c.peft.ia3.feedforward_modules = r".*/down_proj"  # of those, scale the input, not the output
    # Bottleneck adapters on sublayer outputs, before the residual add.
    c.peft.adapter = ml_collections.ConfigDict()
    c.peft.adapter.bottleneck = 16  # hidden width of each adapter (d -> bottleneck -> d)
    c.peft.adapter.activation = "relu"  # 'relu' | 'gelu' | 'silu'
    c.peft.adapter.placement = "houlsby"  # 'houlsby': after attention and MLP; 'pfeiffer': MLP
    c.peft.adapter.attn_output = r".*/attn/o_proj"  # the attention output projection(s)
    c.peft.adapter.mlp_output = r".*/mlp/down_proj"  # the MLP output projection(s)
    # BitFit: biases only (Llama has none: use include_norms).
    c.peft.bitfit = ml_collections.ConfigDict()
    c.peft.bitfit.include_norms = False  # also train norm scales (the bias-free variant)
    c.peft.bitfit.norm_params = r".*norm/scale"  # which params are norm scales
    # Prefix tuning: trainable key/value vectors in front of every layer's attention.
    c.peft.prefix = ml_collections.ConfigDict()
    c.peft.prefix.num_virtual_tokens = 16  # P prefix vectors per layer (and kv head)
    c.peft.prefix.projection = False  # train through PEFT's tanh MLP (fold it for inference)
    c.peft.prefix.projection_hidden = 0  # that MLP's width; 0 = kv_heads * head_dim (PEFT's)
    # Li & Liang's init: the base model's own keys/values of a text's tokens (repeated or
    # cut to P); () = PEFT's random N(0, 1), which can swamp a pretrained model's attention.
    c.peft.prefix.init_token_ids = ()
    c.peft.prefix.init_text = ""  # or a text: the trainer tokenizes it into init_token_ids
    # Prompt tuning: trainable soft tokens prepended to the input embeddings.
    c.peft.prompt = ml_collections.ConfigDict()
    c.peft.prompt.num_virtual_tokens = 16  # N soft tokens
    c.peft.prompt.init_token_ids = ()  # token ids (of a text) to init from; () = random vocab
    c.peft.prompt.init_text = ""  # or a text: the trainer tokenizes it into init_token_ids

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 5e-4  # peak, after linear warmup
    c.optim.warmup_steps = 10
    c.optim.end_lr_ratio = 0.1  # cosine decays to learning_rate * end_lr_ratio
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.01
    c.optim.no_decay = r".*(scale|bias)"  # params without weight decay (norms, biases)
    c.optim.grad_clip_norm = 1.0  # global-norm clipping; 0 = off
    c.optim.grad_accum_steps = 1  # optax.MultiSteps micro-batches per update

    c.data = ml_collections.ConfigDict()
    c.data.source = "rt_snippets"  # 'rt_snippets' | 'jsonl' | 'csv' | 'tfds'
    c.data.path = ""  # file for jsonl / csv
    c.data.tfds_name = ""  # tfds.data_source name, e.g. 'imdb_reviews'
    c.data.tfds_split = "train"
    c.data.tfds_data_dir = ""
    c.data.format = "classification"  # 'text' | 'prompt_completion' | 'chat' | 'classification'
    c.data.text_field = "text"
    c.data.prompt_field = "prompt"
    c.data.completion_field = "completion"
    c.data.messages_field = "messages"
    c.data.label_field = "label"
    c.data.id_field = ""  # record id for the split hash; '' = hash the content
    c.data.prompt_template = "Review: {text}\nSentiment:"  # classification prompt
    c.data.label_words = ("negative", "positive")  # class i -> completion ' ' + label_words[i]
    c.data.seq_len = 128  # max tokens per row
    # Train batches pad to their longest row rounded up to this; eval packs examples into
    # rows of the longest example rounded up to it (0 = seq_len for both). Each new length
    # compiles once; 8 here pads train batches 1.14x (16: 1.26x), ~5% faster steps.
    c.data.pad_to_multiple = 8
    c.data.pack = False  # pack several examples per row (text / prompt_completion)
    c.data.group_by_length = (
        16  # batch similar lengths within windows of this many batches (0 = off)
    )
    c.data.split = (0.8, 0.1, 0.1)  # train / val / test by a stable hash of each record
    c.data.split_seed = 0
    c.data.shuffle_seed = 0
    c.data.batch_size = 8  # global batch (rows per step)
    # Rows per eval batch. A causal LM's rows are packed (~2.4 snippets each here): 16 rows
    # of 80 tokens ran ~3% faster than 32 on 2 CPU cores (benchmarks/README.md).
    c.data.eval_batch_size = 16

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 50  # steps between val evals
    c.eval.max_examples = 200  # val subset per eval (0 = all); test always uses all
    c.eval.metric = "accuracy"  # val metric for best checkpoint / early stopping
    c.eval.mode = "max"  # 'max' | 'min'
    c.eval.patience = 0  # evals without improvement before stopping; 0 = never
    c.eval.zero_shot = True  # evaluate the untrained model on test first

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 50  # steps between resumable checkpoints
    c.checkpoint.keep = 2  # resumable checkpoints kept (plus the best params)
    c.checkpoint.async_save = True

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1 = all devices not used by other axes
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    # Logical axis -> mesh axes; every logical axis of every param must appear.
    c.sharding_rules = (
        ("layers", None),
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv", "tensor"),
        ("norm", None),
        ("lora_rank", None),
        ("adapter", None),  # bottleneck adapters' hidden dim: small, replicated
        ("prefix", None),  # prefix tuning's virtual tokens
        ("prompt", None),  # prompt tuning's soft tokens
    )
    return c


def get_sweep(arg=None):
    """LoRA rank ablation: `python -m ftlib.sweep --config=configs/default.py --workdir=DIR`."""
    del arg
    return [{"peft.lora.rank": r, "peft.lora.alpha": 2.0 * r} for r in (2, 8, 32)]
