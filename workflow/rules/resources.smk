# Inputs materialized once, on the submit host (localrule): compute jobs need no network.


rule materialize_model:
    output:
        directory("resources/models/{model}"),
    params:
        source=lambda wc: model_spec(wc)["source"],
    log:
        "results/logs/materialize_model/{model}.log",
    conda:
        "../../environment.yml"
    localrule: True
    shell:
        "wanda-core --max-threads {threads} --log {log} materialize --model {params.source:q} --out {output}"


rule prepare_dataset:
    output:
        "resources/data/{dataset}.jsonl",
    params:
        spec=lambda wc: json.dumps(config["datasets"][wc.dataset]),
    log:
        "results/logs/prepare_dataset/{dataset}.log",
    conda:
        "../../environment.yml"
    localrule: True
    shell:
        "wanda-core --max-threads {threads} --log {log} prepare-data --spec {params.spec:q} --out {output}"
