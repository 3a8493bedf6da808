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
        args=finetune_args,
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
        "wanda-core --gpus {resources.gpu} --max-threads {threads} --log {log} finetune --model {input.model} {params.args}"
        " --data {input.data} --out {output} --quiet"


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
        args=progressive_prune_args,
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
        "wanda-core --gpus {resources.gpu} --max-threads {threads} --log {log} prune --model {input.model} {params.args}"
        " --out {output.weights} --stats {output.layers} --report {output.report} --quiet"


rule progressive_finetune:
    input:
        model="resources/models/{model}",
        pruned="results/progressive/{model}/{chain}/pruned.safetensors",
        data=progressive_finetune_data,
    output:
        directory("results/progressive/{model}/{chain}/finetuned"),
    params:
        args=progressive_finetune_args,
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
        "wanda-core --gpus {resources.gpu} --max-threads {threads} --log {log} finetune --model {input.model} {params.args}"
        " --data {input.data} --out {output} --quiet"


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
