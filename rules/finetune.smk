# The fine-tune proof (config key `finetune_proof`, nullcov/proof_job.py; docs/finetune-proof.md): teach the
# model a shape it never saw, unconstrained, with prior preservation and projected, and measure what else moved.


rule finetune_proof:
    """Every variant to the same concept fidelity; preserved prompts' accuracy, pixel and attn2 change; weights and grid."""
    input:
        schedule="results/schedule.json",
        model=model_input,
        projections=expand("results/projections/{name}.h5", name=SHARD_FILE_NAMES),
        covariance=expand("results/covariance/{name}.h5", name=SHARD_FILE_NAMES),
    output:
        table=report(
            "results/report/finetune/variants.tsv",
            caption="../report/finetune.rst",
            category="6. Fine-tune proof",
            labels={"table": "variants"},
        ),
        figure=report(
            "results/report/finetune/variants.png",
            caption="../report/finetune.rst",
            category="6. Fine-tune proof",
            labels={"figure": "fidelity and preservation"},
        ),
        grid=report(
            "results/report/finetune/grid.png",
            caption="../report/finetune_grid.rst",
            category="6. Fine-tune proof",
            labels={"figure": "image grid"},
        ),
        grid_images="results/report/finetune/grid.npz",
        weights=expand("results/report/finetune/{variant}/unet_attn2.safetensors", variant=FINETUNE_VARIANTS),
    log:
        "logs/report/finetune.log",
    benchmark:
        "benchmarks/finetune/finetune.tsv"
    conda:
        "../envs/nullcov.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=finetune_mem_mb,
    params:
        model_spec=config["model"],
        model_dir=str(MODEL_DIR),
        statistics_prompts=PROMPTS,
        config=feature_config(config)
        | {
            key: config[key]
            for key in ("device", "batch_size", "strict_prompts", "nullspace_threshold", "threshold_percent")
        },
        settings=FINETUNE_SETTINGS,
    script:
        "../scripts/finetune_proof.py"
