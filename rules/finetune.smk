# The fine-tune proof (config key `finetune_proof`, nullcov/proof/job.py; docs/finetune-proof.md): teach the
# model a shape it never saw, unconstrained, with prior preservation and projected, and measure what else moved.


rule finetune_proof:
    """Every variant to the same concept fidelity; preserved prompts' accuracy, pixel and attn2 change; weights, grid;
    the null space's share of the concept's and the preserved prompts' inputs."""
    input:
        schedule=RESULTS.schedule,
        model=model_input,
        projections=projection_files(SHARD_FILE_NAMES),
        covariance=covariance_files(SHARD_FILE_NAMES),
    output:
        table=report(
            FINETUNE_OUTPUTS["table"],
            caption="../report/finetune.rst",
            category="6. Fine-tune proof",
            labels={"table": "variants"},
        ),
        figure=report(
            FINETUNE_OUTPUTS["figure"],
            caption="../report/finetune.rst",
            category="6. Fine-tune proof",
            labels={"figure": "fidelity and preservation"},
        ),
        grid=report(
            FINETUNE_OUTPUTS["grid"],
            caption="../report/finetune_grid.rst",
            category="6. Fine-tune proof",
            labels={"figure": "image grid"},
        ),
        grid_images=FINETUNE_OUTPUTS["grid_images"],
        null_energy=report(
            FINETUNE_OUTPUTS["null_energy"],
            caption="../report/finetune_null_energy.rst",
            category="6. Fine-tune proof",
            labels={"table": "null-space energy"},
        ),
        weights=expand(RESULTS.finetune("{variant}", nc_layout.FINETUNE_WEIGHTS), variant=FINETUNE_VARIANTS),
    log:
        "logs/report/finetune.log",
    benchmark:
        "benchmarks/finetune/finetune.tsv"
    conda:
        "../envs/nullcov.yaml"
    threads: GPU_JOB_THREADS
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
        variants=FINETUNE_VARIANTS,  # in the order of output.weights
    script:
        "../scripts/finetune_proof.py"
