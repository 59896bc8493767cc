"""The participant client library and `backchannel` command. Arrives with the client issue."""
