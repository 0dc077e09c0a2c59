# The fine-tune proof (config key `finetune_proof`, nullcov/finetune.py): a short DreamBooth-style
# fine-tune of the cross-attention linears with and without the projections, on held-out prompts.


rule finetune_proof:
    """Concept loss and how far preserved prompts move: unconstrained, then projected (per timestep, all timesteps) to the same loss."""
    input:
        schedule="results/schedule.json",
        model=model_input,
        projections=expand("results/projections/{name}.h5", name=SHARD_FILE_NAMES),
        covariance=expand("results/covariance/{name}.h5", name=SHARD_FILE_NAMES),
    output:
        table=report(
            "results/report/finetune/finetune.tsv",
            caption="../report/finetune.rst",
            category="6. Fine-tune proof",
            labels={"table": "fine-tune proof"},
        ),
        figure=report(
            "results/report/finetune/finetune.png",
            caption="../report/finetune.rst",
            category="6. Fine-tune proof",
            labels={"figure": "fine-tune proof"},
        ),
        curves="results/report/finetune/finetune_curves.tsv",
    log:
        "logs/report/finetune.log",
    benchmark:
        "benchmarks/finetune/finetune.tsv"
    conda:
        "../envs/nullcov.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=lambda wildcards, attempt: 16000 * attempt,
    params:
        model_dir=str(MODEL_DIR),
        held_out_prompts=VALIDATION_PROMPTS[:FINETUNE_HELD_OUT],
        held_out_first_index=config["validation_seed_offset"],
        trained_prompts=PROMPTS[:FINETUNE_HELD_OUT],
        config=feature_config(config) | {"device": config["device"]},
        steps=config["finetune_steps"],
        max_steps=config["finetune_max_steps"],
        learning_rate=config["finetune_learning_rate"],
        projected_learning_rate=config["finetune_projected_learning_rate"],
        threshold_percents=config["finetune_threshold_percents"],
    script:
        "../scripts/finetune_proof.py"
