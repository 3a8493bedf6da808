# Evaluations per (pruned model, data set): the pruned weights are applied to the dense model, never re-pruned.


rule perplexity:
    input:
        unpack(eval_inputs),
    output:
        "results/ppl/{model}/{method}/{pattern}/{seed}/{dataset}.parquet",
    params:
        pruned=lambda wc, input: f"--pruned {input.pruned}" if "pruned" in input.keys() else "",
        model=model_flags,
        seqlen=lambda wc: grid.seqlen_option(config, wc.model, "perplexity"),
        max_windows=lambda wc: (
            f"--max-windows {config['evals']['perplexity']['max_windows']}"
            if config["evals"]["perplexity"]["max_windows"]
            else ""
        ),
        batch_size=config["evals"]["perplexity"]["batch_size"],
        dtype=lambda wc: model_spec(wc)["dtype"],
        device=config["device"],
    threads: threads_for
    resources:
        gpu=gpus,
        mem_mb=lambda wc: model_spec(wc)["mem_mb"],
        runtime=lambda wc: model_spec(wc)["runtime"],
    log:
        "results/logs/perplexity/{model}/{method}/{pattern}/{seed}/{dataset}.log",
    benchmark:
        "results/benchmarks/perplexity/{model}/{method}/{pattern}/{seed}/{dataset}.tsv"
    conda:
        "../../environment.yml"
    shell:
        "wanda-core --gpus {resources.gpu} --max-threads {threads} --log {log} eval-ppl --model {input.model} {params.model} {params.pruned}"
        " --data {input.data} --seqlen {params.seqlen} {params.max_windows} --batch-size {params.batch_size}"
        " --dtype {params.dtype} --device {params.device} --out {output} --quiet"


rule zeroshot:
    input:
        unpack(eval_inputs),
    output:
        "results/zeroshot/{model}/{method}/{pattern}/{seed}/{task}.parquet",
    params:
        pruned=lambda wc, input: f"--pruned {input.pruned}" if "pruned" in input.keys() else "",
        model=model_flags,
        include=f"--include-path {TASK_DIR}" if TASK_DIR else "",
        limit=f"--limit {ZEROSHOT['limit']}" if ZEROSHOT["limit"] else "",
        batch_size=ZEROSHOT["batch_size"],
        seed=ZEROSHOT["seed"],
        # lm-eval's request cache ignores which model answered: one cache per pruned model.
        cache=lambda wc: (
            f"--cache results/zeroshot/{run_of(wc).path}/lm-eval-cache/{wc.task}"
            if ZEROSHOT["cache"]
            else ""
        ),
        dtype=lambda wc: model_spec(wc)["dtype"],
        device=config["device"],
    threads: threads_for
    resources:
        gpu=gpus,
        mem_mb=lambda wc: model_spec(wc)["mem_mb"],
        runtime=lambda wc: model_spec(wc)["runtime"],
    log:
        "results/logs/zeroshot/{model}/{method}/{pattern}/{seed}/{task}.log",
    benchmark:
        "results/benchmarks/zeroshot/{model}/{method}/{pattern}/{seed}/{task}.tsv"
    conda:
        "../../environment.yml"
    shell:
        "wanda-core --gpus {resources.gpu} --max-threads {threads} --log {log} eval-zeroshot --model {input.model} {params.model} {params.pruned}"
        " --task {wildcards.task} {params.include} {params.limit} --batch-size {params.batch_size} --seed {params.seed}"
        " {params.cache} --dtype {params.dtype} --device {params.device} --out {output} --quiet"
