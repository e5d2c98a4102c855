from dsvl_jax.demo.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
