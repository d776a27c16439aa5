"""`yagg serve`: the HTTP stage. It owns HTTP, the job queue and batching, and asks the inference core
(inference/generator.py) for clips.

    settings.py   every flag, declared once        app.py        the FastAPI routes (`create_app`)
    jobs.py       jobs and the bounded job store    scheduler.py  the one thread that batches clips on the devices
    loading.py    load, compile, follow a workdir   metrics.py    Prometheus metrics
    main.py       uvicorn with a draining SIGTERM   static/       the web page
"""
