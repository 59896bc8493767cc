"""The relay (backchannel-relay). Arrives with the relay issue."""
