"""The only place bytes enter or leave the process: UDP sockets, TCP stream
framing, LAN discovery."""
