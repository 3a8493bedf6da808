# Pruning per (model, method, pattern): bit-packed masks + kept values, and per-layer statistics.


rule prune:
    input:
        unpack(prune_inputs),
    output:
        weights="results/pruned/{model}/{method}/{pattern}.safetensors",
        layers="results/pruned/{model}/{method}/{pattern}.layers.parquet",
        report="results/pruned/{model}/{method}/{pattern}.json",
    params:
        args=prune_args,
        calibration=lambda wc, input: f"--calibration {input.calibration}" if "calibration" in input.keys() else "",
        dtype=lambda wc: model_spec(wc)["dtype"],
        batch_size=lambda wc: model_spec(wc)["batch_size"],
        device=config["device"],
    threads: threads_for
    resources:
        gpu=gpus,
        mem_mb=lambda wc: model_spec(wc)["mem_mb"],
        runtime=lambda wc: model_spec(wc)["runtime"],
    log:
        "logs/prune/{model}/{method}/{pattern}.log",
    conda:
        "../../environment.yml"
    shell:
        "wanda-core --gpus {resources.gpu} --max-threads {threads} --log {log} prune --model {input.model} {params.args}"
        " {params.calibration} --dtype {params.dtype} --device {params.device} --batch-size {params.batch_size}"
        " --out {output.weights} --stats {output.layers} --report {output.report} --quiet"
