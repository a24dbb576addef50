"""Teachers served outside the training processes: the HTTP layer shared by every backend (`http`), the vLLM client
(`vllm_client`), trl_opd's own teacher server (`teacher_server`) and its client (`trl_opd_client`)."""
