"""Tests of the Kafka agent, produce, the embedded broker and the demo."""
