"""Test suite: runs on the CPU in minutes with tiny configs."""
