"""Media decoding and the typed inputs that processors hand to vision towers."""
