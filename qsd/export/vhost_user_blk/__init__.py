"""vhost-user-blk export: the vhost-user back end, its virtqueues, one context per queue."""
