from ringserve.gpu_worker.process import main

main()
