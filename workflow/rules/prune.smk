# Pruning per (model, method, pattern, calibration seed): bit-packed masks (+ kept values when the method changed
# them) and per-layer statistics. A 'match-<method>' pattern also takes <method>'s report: it prunes at the sparsity
# measured there.


rule prune:
    input:
        unpack(prune_inputs),
    output:
        weights=pruned_weights("results/pruned/{model}/{method}/{pattern}/{seed}.safetensors"),
        layers="results/pruned/{model}/{method}/{pattern}/{seed}.layers.parquet",
        report="results/pruned/{model}/{method}/{pattern}/{seed}.json",
    params:
        args=prune_args,
    threads: threads_for
    resources:
        gpu=gpus,
        mem_mb=lambda wc: model_spec(wc)["mem_mb"],
        runtime=lambda wc: model_spec(wc)["runtime"],
    log:
        "results/logs/prune/{model}/{method}/{pattern}/{seed}.log",
    benchmark:
        "results/benchmarks/prune/{model}/{method}/{pattern}/{seed}.tsv"
    conda:
        "../../environment.yml"
    shell:
        "wanda-core --gpus {resources.gpu} --max-threads {threads} --log {log} prune --model {input.model} {params.args}"
        " --out {output.weights} --stats {output.layers} --report {output.report} --quiet"
