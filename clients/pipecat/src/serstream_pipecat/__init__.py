"""serstream speech emotion for Pipecat pipelines (placeholder while building)."""
