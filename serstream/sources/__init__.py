"""Audio sources: microphone, file replay, network ingest."""
