"""GLM-4-Voice for many users on Ray Serve: replicas, placement, failover and autoscaling by Ray.

    python -m glm4voice.serve --model-path ... --tokenizer-path ... --flow-path ... --engine-replicas 2

Deployments (each module one job):

- :mod:`~glm4voice.serve.engine`: ``TokenEngine``, one token engine per replica (one GPU each);
- :mod:`~glm4voice.serve.speech`: ``SpeechSide``, the speech tokenizer and decoder (with the block
  batcher shared by the replica's turns), on an engine's GPU or on GPUs of its own;
- :mod:`~glm4voice.serve.ingress`: ``Ingress``, the HTTP surface: the token server's app
  (``/generate_stream``, ``/health``, ``/metrics``) and the OpenAI-compatible routes, over the replicas.

Around them: :mod:`~glm4voice.serve.config` (what is deployed where, validated once),
:mod:`~glm4voice.serve.messages` (what the deployments send each other), :mod:`~glm4voice.serve.tokens`
and :mod:`~glm4voice.serve.turns` (the callers' side of an engine stream and of a speech turn),
:mod:`~glm4voice.serve.batches`, :mod:`~glm4voice.serve.app` (deploy and undeploy) and
:mod:`~glm4voice.serve.cli` (the command). Ray is an optional dependency (``requirements-serve.txt``):
nothing outside this package imports it.
"""
