from tokenmill.launch.cli import main

# guarded: engines that start worker processes by spawning (vLLM) re-import this module
if __name__ == "__main__":
    raise SystemExit(main())
