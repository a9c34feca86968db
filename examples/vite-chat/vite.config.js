import react from "@vitejs/plugin-react";
import { defineConfig } from "vite";

// The dev server passes /aisdk/ and /chat/ to the gateway, so the page and the API share
// an origin (no CORS to set up). STREAMGATE_URL names the gateway.
const gateway = process.env.STREAMGATE_URL ?? "http://127.0.0.1:8000";

export default defineConfig({
  plugins: [react()],
  server: { proxy: { "/aisdk": gateway, "/chat": gateway } },
  preview: { proxy: { "/aisdk": gateway, "/chat": gateway } },
});
