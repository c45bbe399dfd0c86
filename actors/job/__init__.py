"""The job wing: one attempt of one chat job, from its claim to its terminal records.

Its only entrance is `run_conversation`, which the intake calls for each request it
takes (pyproject.toml's import contracts keep it so): claim -> retrieve -> prompt ->
reserve -> stream the answer -> decide the outcome -> record. The long-lived actors
(intake, claims, lease keeper, sinks, supervisor) stay in actors/.
"""

from actors.job.conversation import run_conversation

__all__ = ["run_conversation"]
