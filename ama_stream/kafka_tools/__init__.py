"""Kafka tooling that is not the agent: the embedded trial broker (`ama-stream broker`, the demo and
the tests), the camera-feed simulator (`ama-stream produce`) and the reader of a frames topic for
`ama-stream calibrate --source kafka:...` (replay). The agent (ama_stream/agent) imports none of it."""
