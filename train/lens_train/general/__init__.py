"""General abilities of the frozen MLLM (issue 14): MME as in the LENS paper's Table 1, and routing.

LENS claims the MLLM's general abilities are untouched because the MLLM is frozen. This
package measures them the way the paper's Table 1 does (MME, LLaVA-1.5's evaluation
prompt, MME's official scoring) and checks that answers with LENS attached are the
plain MLLM's, answer for answer. It also reads the LENS authors' routing benchmark (does
the agent trigger segmentation when it should?) and scores the agent's router on it.

One concept per module:

- :mod:`.paths`: data roots and confinement of every path to them;
- :mod:`.mme`: the MME release reader and MME's official scoring;
- :mod:`.toy_mme`: a toy MME from the project's synthetic world, in MME's own layout;
- :mod:`.answer`: LLaVA-1.5's MME prompt and asking the frozen MLLM (plain, or with LENS attached);
- :mod:`.mme_eval`: one MME run end to end (answers parquet + scores JSON);
- :mod:`.routing`: the routing benchmark reader, tiers and metrics;
- :mod:`.router`: the trigger decision, by the agent's own router (``lens_train.inference.agent``);
- :mod:`.toy_routing`: a toy routing set from the synthetic world;
- :mod:`.routing_eval`: one routing run end to end;
- :mod:`.outputs`: writing the per-item tables and reports;
- :mod:`.cli`: the ``lens-general`` commands.
"""
