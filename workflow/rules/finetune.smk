# Recovery fine-tuning per (pruned model, recipe), evaluated like the pruned model; and progressive
# schedules: each step prunes the previous step's fine-tuned weights, then fine-tunes, cached per step
# under a folder per step so far (results/progressive/{model}/1-<hash>/2-<hash>/...), so that a longer
# schedule that begins like a shorter one reuses its steps.


rule finetune:
    input:
        unpack(finetune_inputs),
    output:
        directory("results/finetuned/{model}/{method}/{pattern}/{seed}/{recipe}"),
    params:
        pruned=lambda wc, input: f"--pruned {input.pruned}" if "pruned" in input.keys() else "",
        model=model_flags,
        recipe=lambda wc: recipe_args(grid.recipe(config, wc.recipe)),
        dtype=lambda wc: finetune_dtype(wc, grid.recipe(config, wc.recipe)),
        device=config["device"],
    threads: threads_for
    resources:
        gpu=gpus,
        mem_mb=lambda wc: model_spec(wc)["mem_mb"],
        runtime=lambda wc: model_spec(wc)["runtime"],
    log:
        "results/logs/finetune/{model}/{method}/{pattern}/{seed}/{recipe}.log",
    benchmark:
        "results/benchmarks/finetune/{model}/{method}/{pattern}/{seed}/{recipe}.tsv"
    conda:
        "../../environment.yml"
    shell:
        "wanda-core --gpus {resources.gpu} --max-threads {threads} --log {log} finetune --model {input.model} {params.model} {params.pruned}"
        " {params.recipe} --data {input.data} --dtype {params.dtype} --device {params.device} --out {output}"
        " --quiet"


# The evaluations of a fine-tuned model are those of its pruned model, with the result applied on top.
use rule perplexity as perplexity_finetuned with:
    input:
        unpack(finetuned_eval_inputs),
    output:
        "results/ppl/{model}/{method}/{pattern}/{seed}/{dataset}+{recipe}.parquet",
    params:
        pruned=finetuned_eval_args,
    log:
        "results/logs/perplexity/{model}/{method}/{pattern}/{seed}/{dataset}+{recipe}.log",
    benchmark:
        "results/benchmarks/perplexity/{model}/{method}/{pattern}/{seed}/{dataset}+{recipe}.tsv"


use rule zeroshot as zeroshot_finetuned with:
    input:
        unpack(finetuned_eval_inputs),
    output:
        "results/zeroshot/{model}/{method}/{pattern}/{seed}/{task}+{recipe}.parquet",
    params:
        pruned=finetuned_eval_args,
        cache=lambda wc: (
            f"--cache results/zeroshot/{run_of(wc).path}/lm-eval-cache/{wc.task}+{wc.recipe}"
            if ZEROSHOT["cache"]
            else ""
        ),
    log:
        "results/logs/zeroshot/{model}/{method}/{pattern}/{seed}/{task}+{recipe}.log",
    benchmark:
        "results/benchmarks/zeroshot/{model}/{method}/{pattern}/{seed}/{task}+{recipe}.tsv"


rule progressive_prune:
    input:
        unpack(progressive_prune_inputs),
    output:
        weights="results/progressive/{model}/{chain}/pruned.safetensors",
        layers="results/progressive/{model}/{chain}/pruned.layers.parquet",
        report="results/progressive/{model}/{chain}/pruned.json",
    params:
        model=model_flags,
        args=progressive_prune_args,
        dtype=lambda wc: model_spec(wc)["dtype"],
        batch_size=lambda wc: model_spec(wc)["batch_size"],
        device=config["device"],
    threads: threads_for
    resources:
        gpu=gpus,
        mem_mb=lambda wc: model_spec(wc)["mem_mb"],
        runtime=lambda wc: model_spec(wc)["runtime"],
    log:
        "results/logs/progressive/{model}/{chain}/prune.log",
    benchmark:
        "results/benchmarks/progressive/{model}/{chain}/prune.tsv"
    conda:
        "../../environment.yml"
    shell:
        "wanda-core --gpus {resources.gpu} --max-threads {threads} --log {log} prune --model {input.model} {params.model} {params.args}"
        " --dtype {params.dtype} --device {params.device} --batch-size {params.batch_size}"
        " --out {output.weights} --stats {output.layers} --report {output.report} --quiet"


rule progressive_finetune:
    input:
        model="resources/models/{model}",
        pruned="results/progressive/{model}/{chain}/pruned.safetensors",
        data=progressive_finetune_data,
    output:
        directory("results/progressive/{model}/{chain}/finetuned"),
    params:
        model=model_flags,
        recipe=lambda wc: recipe_args(grid.chain_step(config, wc.chain)["recipe"]),
        dtype=lambda wc: finetune_dtype(wc, grid.chain_step(config, wc.chain)["recipe"]),
        device=config["device"],
    threads: threads_for
    resources:
        gpu=gpus,
        mem_mb=lambda wc: model_spec(wc)["mem_mb"],
        runtime=lambda wc: model_spec(wc)["runtime"],
    log:
        "results/logs/progressive/{model}/{chain}/finetune.log",
    benchmark:
        "results/benchmarks/progressive/{model}/{chain}/finetune.tsv"
    conda:
        "../../environment.yml"
    shell:
        "wanda-core --gpus {resources.gpu} --max-threads {threads} --log {log} finetune --model {input.model} {params.model} --pruned {input.pruned}"
        " {params.recipe} --data {input.data} --dtype {params.dtype} --device {params.device} --out {output}"
        " --quiet"


use rule perplexity as perplexity_progressive with:
    input:
        unpack(progressive_eval_inputs),
    output:
        "results/ppl/{model}/{method}/{pattern}/{seed}/{dataset}+{schedule}.parquet",
    params:
        pruned=finetuned_eval_args,
    log:
        "results/logs/perplexity/{model}/{method}/{pattern}/{seed}/{dataset}+{schedule}.log",
    benchmark:
        "results/benchmarks/perplexity/{model}/{method}/{pattern}/{seed}/{dataset}+{schedule}.tsv"


use rule zeroshot as zeroshot_progressive with:
    input:
        unpack(progressive_eval_inputs),
    output:
        "results/zeroshot/{model}/{method}/{pattern}/{seed}/{task}+{schedule}.parquet",
    params:
        pruned=finetuned_eval_args,
        cache=lambda wc: (
            f"--cache results/zeroshot/{run_of(wc).path}/lm-eval-cache/{wc.task}+{wc.schedule}"
            if ZEROSHOT["cache"]
            else ""
        ),
    log:
        "results/logs/zeroshot/{model}/{method}/{pattern}/{seed}/{task}+{schedule}.log",
    benchmark:
        "results/benchmarks/zeroshot/{model}/{method}/{pattern}/{seed}/{task}+{schedule}.tsv"
