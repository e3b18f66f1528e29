"""The paper's tables end to end: caches -> training runs -> evaluations -> Markdown
(:mod:`.reproduce`, run as ``python -m lens_train.reproduction {table2,table3,demo}``; ``make demo``,
``make reproduce-table2``), and ``make demo-core``: the LENS core alone on planted synthetic tensors
(:mod:`.demo_core`, ``python -m lens_train.reproduction.demo_core``).
"""
