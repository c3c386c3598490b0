"""`horderun`: a horovodrun-style launcher on an etcd rendezvous."""
