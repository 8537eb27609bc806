"""rag_dpo: train retrieval agents with process supervision (step-level rewards) and compare them with
outcome-only supervision.

Stages, in data-flow order (a stage imports only from earlier ones and from the shared helpers
`errors`, `records`, `io`, `metrics`, `config`, `tracking`, `paths`):
data -> retrieval -> agent -> annotate -> pairs -> train -> eval -> pipeline.
"""

__version__ = "0.1.0"
