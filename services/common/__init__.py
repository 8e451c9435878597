"""Small pieces the encoder and decoder services share (never engines, never the gateway)."""
