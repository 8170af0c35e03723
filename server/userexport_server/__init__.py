"""The users-export gRPC server."""
