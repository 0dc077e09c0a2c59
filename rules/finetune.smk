# The fine-tune proof (config key `finetune_proof`, nullcov/proof/job.py; docs/finetune-proof.md): teach the
# model a shape it never saw, unconstrained, with prior preservation and projected, and measure what else moved.
# Planned once at parse time (FINETUNE_PLAN, nullcov.proof.plan): the job gets the plan as one param, and
# reads the files it declares. The projection settings the proof compares that the run did not make come
# from the rules below (results/proof/, nullcov.layout.Results.proof_statistics, .proof_projection), built
# as the run's own: the other CFG-branch setting's statistics (proof_features, proof_covariance) and the
# projections at the other statistics and thresholds (proof_projection).


use rule features as proof_features with:
    output:
        scratch_output(RESULTS.proof_statistics("{branches}").shard(PROOF_SHARD)),
    log:
        "logs/proof/features/{branches}.log",
    benchmark:
        "benchmarks/proof/features/{branches}.tsv"
    wildcard_constraints:
        branches=PROOF_WILDCARDS["branches"],
    resources:
        gpu=1,
        mem_mb=feature_job_mem_mb,
        runtime=proof_features_minutes,
    params:
        prompts=PROMPTS,
        first_index=0,
        shard=PROOF_SHARD,
        config=proof_features_config,


use rule covariance as proof_covariance with:
    input:
        RESULTS.proof_statistics("{branches}").shard(PROOF_SHARD),
    output:
        RESULTS.proof_statistics("{branches}").covariance("{name}"),
    log:
        "logs/proof/covariance/{branches}/{name}.log",
    benchmark:
        "benchmarks/proof/covariance/{branches}/{name}.tsv"
    wildcard_constraints:
        branches=PROOF_WILDCARDS["branches"],
    params:
        kind="features",


use rule covariance_text as proof_covariance_text with:
    input:
        RESULTS.proof_statistics("{branches}").shard(PROOF_SHARD),
    output:
        RESULTS.proof_statistics("{branches}").covariance(nc_layout.TEXT_NAME),
    log:
        "logs/proof/covariance/{branches}/text.log",
    benchmark:
        "benchmarks/proof/covariance/{branches}/text.tsv"
    wildcard_constraints:
        branches=PROOF_WILDCARDS["branches"],
    params:
        kind="features",


use rule projection as proof_projection with:
    input:
        proof_projection_input,
    output:
        RESULTS.proof_projection("{branches}", "{statistic}", "{threshold}", "{name}"),
    log:
        "logs/proof/projections/{branches}/{statistic}/{threshold}/{name}.log",
    benchmark:
        "benchmarks/proof/projections/{branches}/{statistic}/{threshold}/{name}.tsv"
    wildcard_constraints:
        **PROOF_WILDCARDS,
    params:
        statistic=lambda wildcards: wildcards.statistic,
        nullspace_threshold=lambda wildcards: proof_threshold(wildcards, 0),
        threshold_percent=lambda wildcards: proof_threshold(wildcards, 1),


use rule projection_text as proof_projection_text with:
    input:
        proof_projection_input,
    output:
        RESULTS.proof_projection("{branches}", "{statistic}", "{threshold}", nc_layout.TEXT_NAME),
    log:
        "logs/proof/projections/{branches}/{statistic}/{threshold}/text.log",
    benchmark:
        "benchmarks/proof/projections/{branches}/{statistic}/{threshold}/text.tsv"
    wildcard_constraints:
        **PROOF_WILDCARDS,
    params:
        statistic=lambda wildcards: wildcards.statistic,
        nullspace_threshold=lambda wildcards: proof_threshold(wildcards, 0),
        threshold_percent=lambda wildcards: proof_threshold(wildcards, 1),


rule finetune_proof:
    """Every run's learning-vs-forgetting curve (checkpoints: fidelity, preserved accuracy and pixel change, weights);
    the variants at matched fidelity; at each run's end every preserved prompt; grid; the null space's share."""
    input:
        schedule=RESULTS.schedule,
        model=model_input,
        projections=FINETUNE_PLAN.files("projections"),
        covariance=FINETUNE_PLAN.files("covariance"),
    output:
        table=report(
            FINETUNE_OUTPUTS["table"],
            caption="../report/finetune.rst",
            category="6. Fine-tune proof",
            labels={"table": "variants"},
        ),
        curves=FINETUNE_OUTPUTS["curves"],
        matched=report(
            FINETUNE_OUTPUTS["matched"],
            caption="../report/finetune.rst",
            category="6. Fine-tune proof",
            labels={"table": "matched fidelity"},
        ),
        figure=report(
            FINETUNE_OUTPUTS["figure"],
            caption="../report/finetune.rst",
            category="6. Fine-tune proof",
            labels={"figure": "learning vs forgetting"},
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
        weights=[directory(str(RESULTS.finetune(run))) for run in FINETUNE_PLAN.names],
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
        model_dir=str(MODEL_DIR),
        device=config["device"],
        statistics_prompts=PROMPTS,
        plan=FINETUNE_PLAN.to_dict(),  # its variants in the order of output.weights
    script:
        "../scripts/finetune_proof.py"
