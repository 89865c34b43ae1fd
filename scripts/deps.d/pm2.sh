# tests/integration/e2e/pm2.rs: PM2 (from npm, into .test-deps/npm) restarts
# a Node app so it reads the new NODE_EXTRA_CA_CERTS.
npm_needs pm2 pm2@7
