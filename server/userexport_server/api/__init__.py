"""The gRPC surface: proto <-> domain, auth, error mapping. No SQL, no file I/O."""
